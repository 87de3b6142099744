//! Prompt cleaning as Wan's `HuggingfaceTokenizer(clean='whitespace')` does it: an
//! `ftfy.fix_text`-like pass, HTML unescaping twice, whitespace collapsed, stripped.
//!
//! `ftfy` has no Rust twin; [`fix_text`] does the fixes that change prompts typed by people
//! (see docs/text-encoder.md for what is and is not covered): HTML entities (repeated until
//! stable, unless the line has a `<`), C1 controls read as Windows-1252, Latin ligatures split,
//! full-width / half-width forms to their NFKC form, curly quotes straightened, line breaks
//! unified, terminal escapes and control characters removed, NFC. Mojibake repair (ftfy's
//! `fix_encoding`) is not done.

use tokenizers::NormalizedString;

/// The whole cleaning: [`fix_text`], [`html_unescape`] twice, strip, whitespace collapsed to
/// one space (Python's `\s`, see [`is_py_space`]), strip.
pub fn clean_prompt(text: &str) -> String {
    let t = fix_text(text);
    let t = html_unescape(&html_unescape(&t));
    collapse_whitespace(&t)
}

/// Python's `str.isspace()` (and the `\s` of a `str` regex): the Unicode `White_Space`
/// characters plus the ASCII separators U+001C..U+001F. U+200B (zero width space) is not
/// whitespace.
pub fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `re.sub(r'\s+', ' ', text).strip()`.
pub fn collapse_whitespace(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut pending = false;
    for c in text.chars() {
        if is_py_space(c) {
            pending = !out.is_empty();
        } else {
            if pending {
                out.push(' ');
                pending = false;
            }
            out.push(c);
        }
    }
    out
}

/// The `ftfy.fix_text` subset described in the module docs, line by line as ftfy does (a line
/// with `<` turns HTML unescaping off for the rest of the text).
pub fn fix_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut unescape = true;
    for seg in text.split_inclusive('\n') {
        if seg.contains('<') {
            unescape = false;
        }
        out.push_str(&fix_segment(seg, unescape));
    }
    out
}

/// Applies the fixes until the text no longer changes (ftfy's loop).
fn fix_segment(seg: &str, unescape: bool) -> String {
    let mut text = seg.to_string();
    // Every fix shortens the text or keeps it; the bound only guards against a cycle.
    for _ in 0..16 {
        let orig = text.clone();
        text = remove_terminal_escapes(&text);
        if unescape {
            text = unescape_entities_ftfy(&text);
        }
        text = text.chars().map(fix_c1).collect();
        text = fix_ligatures_and_width(&text);
        text = text.chars().map(uncurl).collect();
        text = text
            .replace("\r\n", "\n")
            .replace(['\r', '\u{2028}', '\u{2029}', '\u{85}'], "\n");
        text.retain(|c| !is_ftfy_control(c));
        let mut n = NormalizedString::from(text.as_str());
        n.nfc();
        text = n.get().to_string();
        if text == orig {
            break;
        }
    }
    text
}

/// Removes ANSI terminal escapes `ESC [ digits-and-semicolons letter`.
fn remove_terminal_escapes(t: &str) -> String {
    let b = t.as_bytes();
    let mut out = String::with_capacity(t.len());
    let mut i = 0;
    let mut last = 0;
    while i < b.len() {
        if b[i] == 0x1b && b.get(i + 1) == Some(&b'[') {
            let mut j = i + 2;
            while j < b.len() && (b[j].is_ascii_digit() || b[j] == b';') {
                j += 1;
            }
            if j < b.len() && b[j].is_ascii_alphabetic() {
                out.push_str(&t[last..i]);
                i = j + 1;
                last = i;
                continue;
            }
        }
        i += 1;
    }
    out.push_str(&t[last..]);
    out
}

/// Windows-1252 for 0x80..=0x9F (the 5 undefined bytes map to themselves, like ftfy's
/// "sloppy" codec and Python's `html.unescape`).
const CP1252_C1: [char; 32] = [
    '\u{20ac}', '\u{81}', '\u{201a}', '\u{192}', '\u{201e}', '\u{2026}', '\u{2020}', '\u{2021}',
    '\u{2c6}', '\u{2030}', '\u{160}', '\u{2039}', '\u{152}', '\u{8d}', '\u{17d}', '\u{8f}',
    '\u{90}', '\u{2018}', '\u{2019}', '\u{201c}', '\u{201d}', '\u{2022}', '\u{2013}', '\u{2014}',
    '\u{2dc}', '\u{2122}', '\u{161}', '\u{203a}', '\u{153}', '\u{9d}', '\u{17e}', '\u{178}',
];

fn fix_c1(c: char) -> char {
    match c as u32 {
        u @ 0x80..=0x9f => CP1252_C1[(u - 0x80) as usize],
        _ => c,
    }
}

/// ftfy's `fix_latin_ligatures` and `fix_character_width` (U+3000 and U+FF01..U+FFEF to their
/// NFKC form).
fn fix_ligatures_and_width(t: &str) -> String {
    let mut out = String::with_capacity(t.len());
    for c in t.chars() {
        let lig = match c {
            '\u{132}' => "IJ",
            '\u{133}' => "ij",
            '\u{149}' => "\u{2bc}n",
            '\u{1c4}' => "D\u{17d}",
            '\u{1c5}' => "D\u{17e}",
            '\u{1c6}' => "d\u{17e}",
            '\u{1c7}' => "LJ",
            '\u{1c8}' => "Lj",
            '\u{1c9}' => "lj",
            '\u{1ca}' => "NJ",
            '\u{1cb}' => "Nj",
            '\u{1cc}' => "nj",
            '\u{1f1}' => "DZ",
            '\u{1f2}' => "Dz",
            '\u{1f3}' => "dz",
            '\u{fb00}' => "ff",
            '\u{fb01}' => "fi",
            '\u{fb02}' => "fl",
            '\u{fb03}' => "ffi",
            '\u{fb04}' => "ffl",
            '\u{fb05}' => "\u{17f}t",
            '\u{fb06}' => "st",
            '\u{3000}' => " ",
            '\u{ff01}'..='\u{ffef}' => {
                let mut n = NormalizedString::from(c.to_string());
                n.nfkc();
                out.push_str(n.get());
                continue;
            }
            _ => {
                out.push(c);
                continue;
            }
        };
        out.push_str(lig);
    }
    out
}

/// ftfy's `uncurl_quotes`: U+02BC and U+2018..U+201B to `'`, U+201C..U+201F to `"`.
fn uncurl(c: char) -> char {
    match c {
        '\u{2bc}' | '\u{2018}'..='\u{201b}' => '\'',
        '\u{201c}'..='\u{201f}' => '"',
        _ => c,
    }
}

/// ftfy's `remove_control_chars` set.
fn is_ftfy_control(c: char) -> bool {
    matches!(c as u32,
        0x00..=0x08 | 0x0b | 0x0e..=0x1f | 0x7f | 0x206a..=0x206f | 0xfeff | 0xfff9..=0xfffc
        | 0x1d173..=0x1d17a | 0xe0000..=0xe007f)
}

/// Named entities decoded here: the HTML 4 set (all "legacy" ones, which Python also decodes
/// without the `;`, come first) and common typographic ones. HTML5's other named entities are
/// left as they are.
const ENTITIES: &[(&str, &str)] = &[
    ("amp", "&"),
    ("lt", "<"),
    ("gt", ">"),
    ("quot", "\""),
    ("AMP", "&"),
    ("LT", "<"),
    ("GT", ">"),
    ("QUOT", "\""),
    ("COPY", "\u{a9}"),
    ("REG", "\u{ae}"),
    ("nbsp", "\u{a0}"),
    ("iexcl", "\u{a1}"),
    ("cent", "\u{a2}"),
    ("pound", "\u{a3}"),
    ("curren", "\u{a4}"),
    ("yen", "\u{a5}"),
    ("brvbar", "\u{a6}"),
    ("sect", "\u{a7}"),
    ("uml", "\u{a8}"),
    ("copy", "\u{a9}"),
    ("ordf", "\u{aa}"),
    ("laquo", "\u{ab}"),
    ("not", "\u{ac}"),
    ("shy", "\u{ad}"),
    ("reg", "\u{ae}"),
    ("macr", "\u{af}"),
    ("deg", "\u{b0}"),
    ("plusmn", "\u{b1}"),
    ("sup2", "\u{b2}"),
    ("sup3", "\u{b3}"),
    ("acute", "\u{b4}"),
    ("micro", "\u{b5}"),
    ("para", "\u{b6}"),
    ("middot", "\u{b7}"),
    ("cedil", "\u{b8}"),
    ("sup1", "\u{b9}"),
    ("ordm", "\u{ba}"),
    ("raquo", "\u{bb}"),
    ("frac14", "\u{bc}"),
    ("frac12", "\u{bd}"),
    ("frac34", "\u{be}"),
    ("iquest", "\u{bf}"),
    ("Agrave", "\u{c0}"),
    ("Aacute", "\u{c1}"),
    ("Acirc", "\u{c2}"),
    ("Atilde", "\u{c3}"),
    ("Auml", "\u{c4}"),
    ("Aring", "\u{c5}"),
    ("AElig", "\u{c6}"),
    ("Ccedil", "\u{c7}"),
    ("Egrave", "\u{c8}"),
    ("Eacute", "\u{c9}"),
    ("Ecirc", "\u{ca}"),
    ("Euml", "\u{cb}"),
    ("Igrave", "\u{cc}"),
    ("Iacute", "\u{cd}"),
    ("Icirc", "\u{ce}"),
    ("Iuml", "\u{cf}"),
    ("ETH", "\u{d0}"),
    ("Ntilde", "\u{d1}"),
    ("Ograve", "\u{d2}"),
    ("Oacute", "\u{d3}"),
    ("Ocirc", "\u{d4}"),
    ("Otilde", "\u{d5}"),
    ("Ouml", "\u{d6}"),
    ("times", "\u{d7}"),
    ("Oslash", "\u{d8}"),
    ("Ugrave", "\u{d9}"),
    ("Uacute", "\u{da}"),
    ("Ucirc", "\u{db}"),
    ("Uuml", "\u{dc}"),
    ("Yacute", "\u{dd}"),
    ("THORN", "\u{de}"),
    ("szlig", "\u{df}"),
    ("agrave", "\u{e0}"),
    ("aacute", "\u{e1}"),
    ("acirc", "\u{e2}"),
    ("atilde", "\u{e3}"),
    ("auml", "\u{e4}"),
    ("aring", "\u{e5}"),
    ("aelig", "\u{e6}"),
    ("ccedil", "\u{e7}"),
    ("egrave", "\u{e8}"),
    ("eacute", "\u{e9}"),
    ("ecirc", "\u{ea}"),
    ("euml", "\u{eb}"),
    ("igrave", "\u{ec}"),
    ("iacute", "\u{ed}"),
    ("icirc", "\u{ee}"),
    ("iuml", "\u{ef}"),
    ("eth", "\u{f0}"),
    ("ntilde", "\u{f1}"),
    ("ograve", "\u{f2}"),
    ("oacute", "\u{f3}"),
    ("ocirc", "\u{f4}"),
    ("otilde", "\u{f5}"),
    ("ouml", "\u{f6}"),
    ("divide", "\u{f7}"),
    ("oslash", "\u{f8}"),
    ("ugrave", "\u{f9}"),
    ("uacute", "\u{fa}"),
    ("ucirc", "\u{fb}"),
    ("uuml", "\u{fc}"),
    ("yacute", "\u{fd}"),
    ("thorn", "\u{fe}"),
    ("yuml", "\u{ff}"),
    // Only with the `;` from here on.
    ("apos", "'"),
    ("OElig", "\u{152}"),
    ("oelig", "\u{153}"),
    ("Scaron", "\u{160}"),
    ("scaron", "\u{161}"),
    ("Yuml", "\u{178}"),
    ("fnof", "\u{192}"),
    ("circ", "\u{2c6}"),
    ("tilde", "\u{2dc}"),
    ("ensp", "\u{2002}"),
    ("emsp", "\u{2003}"),
    ("thinsp", "\u{2009}"),
    ("zwnj", "\u{200c}"),
    ("zwj", "\u{200d}"),
    ("lrm", "\u{200e}"),
    ("rlm", "\u{200f}"),
    ("ndash", "\u{2013}"),
    ("mdash", "\u{2014}"),
    ("lsquo", "\u{2018}"),
    ("rsquo", "\u{2019}"),
    ("sbquo", "\u{201a}"),
    ("ldquo", "\u{201c}"),
    ("rdquo", "\u{201d}"),
    ("bdquo", "\u{201e}"),
    ("dagger", "\u{2020}"),
    ("Dagger", "\u{2021}"),
    ("bull", "\u{2022}"),
    ("hellip", "\u{2026}"),
    ("permil", "\u{2030}"),
    ("prime", "\u{2032}"),
    ("Prime", "\u{2033}"),
    ("lsaquo", "\u{2039}"),
    ("rsaquo", "\u{203a}"),
    ("oline", "\u{203e}"),
    ("frasl", "\u{2044}"),
    ("euro", "\u{20ac}"),
    ("trade", "\u{2122}"),
    ("larr", "\u{2190}"),
    ("uarr", "\u{2191}"),
    ("rarr", "\u{2192}"),
    ("darr", "\u{2193}"),
    ("harr", "\u{2194}"),
    ("minus", "\u{2212}"),
    ("infin", "\u{221e}"),
    ("ne", "\u{2260}"),
    ("le", "\u{2264}"),
    ("ge", "\u{2265}"),
    ("asymp", "\u{2248}"),
    ("loz", "\u{25ca}"),
    ("spades", "\u{2660}"),
    ("clubs", "\u{2663}"),
    ("hearts", "\u{2665}"),
    ("diams", "\u{2666}"),
];

/// How many entries of [`ENTITIES`] Python also decodes without a `;`.
const LEGACY: usize = 106;

fn entity(name: &str, with_semicolon: bool) -> Option<&'static str> {
    let table = if with_semicolon {
        ENTITIES
    } else {
        &ENTITIES[..LEGACY]
    };
    table.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

/// A numeric character reference as Python's `html.unescape` decodes it.
fn numeric_ref(num: Option<u32>) -> String {
    match num {
        Some(0) | None => "\u{fffd}".into(),
        Some(0x0d) => "\r".into(),
        Some(u @ 0x80..=0x9f) => CP1252_C1[(u - 0x80) as usize].to_string(),
        Some(0xd800..=0xdfff) => "\u{fffd}".into(),
        Some(u) if u > 0x10ffff => "\u{fffd}".into(),
        Some(u) if is_invalid_codepoint(u) => String::new(),
        Some(u) => char::from_u32(u).map_or_else(|| "\u{fffd}".into(), String::from),
    }
}

/// Python's `html._invalid_codepoints` (dropped by `html.unescape`).
fn is_invalid_codepoint(u: u32) -> bool {
    matches!(u, 0x1..=0x8 | 0xb | 0xe..=0x1f | 0x7f..=0x9f | 0xfdd0..=0xfdef)
        || (u & 0xfffe) == 0xfffe
}

/// Python's `html.unescape` (named entities limited to the table `ENTITIES` in this module).
pub fn html_unescape(t: &str) -> String {
    replace_refs(t, decode_ref)
}

/// Replaces every `&` that `decode` accepts (given the text after the `&`, it returns the
/// replacement and the bytes it consumed) and keeps the others.
fn replace_refs(t: &str, decode: impl Fn(&str) -> (Option<String>, usize)) -> String {
    if !t.contains('&') {
        return t.to_string();
    }
    let mut out = String::with_capacity(t.len());
    let mut rest = t;
    while let Some(p) = rest.find('&') {
        out.push_str(&rest[..p]);
        let after = &rest[p + 1..];
        match decode(after) {
            (Some(r), used) => {
                out.push_str(&r);
                rest = &after[used..];
            }
            (None, _) => {
                out.push('&');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Decodes the reference after a `&`: the replacement and the bytes of `s` it consumed, or
/// `None` when `s` does not start a reference.
fn decode_ref(s: &str) -> (Option<String>, usize) {
    let b = s.as_bytes();
    if b.first() == Some(&b'#') {
        let hex = matches!(b.get(1), Some(b'x' | b'X'));
        let start = if hex { 2 } else { 1 };
        let len = b[start..]
            .iter()
            .take_while(|c| {
                if hex {
                    c.is_ascii_hexdigit()
                } else {
                    c.is_ascii_digit()
                }
            })
            .count();
        if len == 0 {
            return (None, 0);
        }
        let digits = &s[start..start + len];
        let num = u32::from_str_radix(digits, if hex { 16 } else { 10 }).ok();
        let semi = usize::from(b.get(start + len) == Some(&b';'));
        return (Some(numeric_ref(num)), start + len + semi);
    }
    // [^\t\n\f <&#;]{1,32};?
    let mut end = 0;
    for (n, (i, c)) in s.char_indices().enumerate() {
        if n == 32 || matches!(c, '\t' | '\n' | '\x0c' | ' ' | '<' | '&' | '#' | ';') {
            break;
        }
        end = i + c.len_utf8();
    }
    if end == 0 {
        return (None, 0);
    }
    let name = &s[..end];
    if b.get(end) == Some(&b';') {
        if let Some(v) = entity(name, true) {
            return (Some(v.to_string()), end + 1);
        }
    } else if let Some(v) = entity(name, false) {
        return (Some(v.to_string()), end);
    }
    // The longest legacy entity the name starts with (`&copyright` is `©right`).
    for x in (2..name.len()).rev() {
        if let Some(v) = name.get(..x).and_then(|p| entity(p, false)) {
            return (Some(v.to_string()), x);
        }
    }
    (None, 0)
}

/// ftfy's `unescape_html`: only complete `&name;` / `&#n;` references of at most 24
/// alphanumerics are decoded.
fn unescape_entities_ftfy(t: &str) -> String {
    replace_refs(t, |after| {
        let hash = usize::from(after.starts_with('#'));
        let len = after[hash..]
            .bytes()
            .take_while(u8::is_ascii_alphanumeric)
            .count();
        if !(1..=24).contains(&len) || after.as_bytes().get(hash + len) != Some(&b';') {
            return (None, 0);
        }
        let whole = &after[..hash + len + 1];
        let r = if hash == 1 {
            // Numeric: decoded as Python would, unless that leaves the `;` in place.
            let (r, used) = decode_ref(whole);
            r.filter(|_| used == whole.len())
        } else {
            entity(&after[..len], true).map(str::to_string)
        };
        (r, whole.len())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_count_covers_exactly_the_latin1_entities() {
        assert_eq!(ENTITIES[LEGACY - 1].0, "yuml");
        assert_eq!(ENTITIES[LEGACY].0, "apos");
    }

    #[test]
    fn html_unescape_follows_python() {
        assert_eq!(html_unescape("Tom &amp; Jerry"), "Tom & Jerry");
        assert_eq!(html_unescape("&amp;amp;"), "&amp;");
        assert_eq!(html_unescape("&lt;b&gt; &#65;&#x42;&#67"), "<b> ABC");
        assert_eq!(
            html_unescape("&copyright &foo; & &;"),
            "\u{a9}right &foo; & &;"
        );
        assert_eq!(html_unescape("&hellip; &hellip"), "\u{2026} &hellip");
        assert_eq!(
            html_unescape("&#150; &#0; &#x110000;"),
            "\u{2013} \u{fffd} \u{fffd}"
        );
        assert_eq!(html_unescape("&#1;x"), "x");
    }

    #[test]
    fn whitespace_uses_python_semantics() {
        assert_eq!(collapse_whitespace("  a \t\n b\u{3000}c\u{a0} "), "a b c");
        assert_eq!(collapse_whitespace("a\u{200b}b"), "a\u{200b}b");
        assert_eq!(collapse_whitespace("a\u{1f}b"), "a b");
        assert_eq!(collapse_whitespace(" \n\t"), "");
    }

    #[test]
    fn ftfy_like_fixes() {
        assert_eq!(
            clean_prompt("“Yes”, ‘no’ — ＯＫ… ﬁne"),
            "\"Yes\", 'no' \u{2014} OK\u{2026} fine"
        );
        assert_eq!(clean_prompt("a &amp;amp;amp;amp; b"), "a & b");
        // A `<` turns ftfy's unescaping off: only Wan's two html.unescape passes remain.
        assert_eq!(clean_prompt("<a> &amp;amp;amp;"), "<a> &amp;");
        assert_eq!(
            clean_prompt("\x1b[31mred\x1b[0m \u{93}q\u{94}"),
            "red \"q\""
        );
        assert_eq!(clean_prompt("e\u{301}\u{feff}"), "\u{e9}");
        assert_eq!(clean_prompt("\u{ff76}\u{ff9e}"), "\u{30ac}");
    }
}
