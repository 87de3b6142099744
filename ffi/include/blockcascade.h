/*
 * blockcascade.h — the C ABI of blockcascade, an inference engine for block-causal video
 * diffusion models (the Wan2.1 causal DiT) with Block Cascading.
 *
 * Build the library with `cargo build --release`; it produces target/release/libblockcascade.so
 * (shared) and target/release/libblockcascade.a (static). See ffi/README.md for linking.
 *
 * Conventions
 * -----------
 * - Every function that can fail returns a bc_status. BC_OK (0) means success; on failure a
 *   human-readable message is available from bc_last_error() on the same thread, and no output
 *   parameter has been written.
 * - Option structs start with `struct_size`: set it to sizeof(the struct) — the *_default()
 *   functions do that for you — so that later versions can grow the structs without breaking
 *   code compiled against this header. Only the sizes of the struct's published versions are
 *   accepted (each sizeof of an older header, i.e. the struct ending after the last field of
 *   that version); any other size, e.g. one ending inside a field, is BC_ERR_INVALID_ARGUMENT,
 *   and the message lists the accepted sizes.
 * - Handles (bc_engine*, bc_session*, bc_stream*) are opaque: never dereference them. The library keeps a
 *   registry of live handles, so NULL, closed or made-up handles are reported as
 *   BC_ERR_INVALID_ARGUMENT instead of crashing. Handle values are never reused.
 * - No Rust panic ever crosses this boundary: an internal failure is reported as
 *   BC_ERR_INTERNAL.
 *
 * Thread safety
 * -------------
 * - All functions may be called from any thread.
 * - A bc_engine (the loaded model weights) is immutable once opened and may be shared: several
 *   sessions, on different threads, may be opened from one engine and generate concurrently.
 * - A bc_session is used by one thread at a time. A call on a session that is already inside
 *   another call (on another thread, or re-entrantly from its own block callback) fails with
 *   BC_ERR_INVALID_ARGUMENT rather than blocking; different sessions are independent.
 * - bc_last_error() is per thread.
 *
 * Lifetimes
 * ---------
 * - A session keeps its engine's model alive: bc_engine_close() may be called while sessions
 *   opened from it are still open; they keep working, and the memory is released when the
 *   last of them is closed. The engine handle itself is invalid after bc_engine_close().
 * - Pointers passed in (paths, prompt embeddings, option structs) are only read during the call;
 *   the library copies what it keeps.
 * - Pointers passed out (latents in the block callback, bc_last_error(), bc_version()) are
 *   owned by the library; see each function for how long they stay valid.
 */
#ifndef BLOCKCASCADE_H
#define BLOCKCASCADE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* An opened model (weights). Create with bc_engine_open, destroy with bc_engine_close. */
typedef struct bc_engine bc_engine;

/* A generation context on an engine: options, seed and prompt. Create with bc_session_open,
   destroy with bc_session_close. */
typedef struct bc_session bc_session;

/* Result codes. Values are stable. */
typedef enum {
  BC_OK = 0,                   /* success */
  BC_ERR_INVALID_ARGUMENT = 1, /* bad argument: NULL/closed handle, wrong struct_size, bad shape, NaN, ... */
  BC_ERR_IO = 2,               /* a file could not be opened, read or written */
  BC_ERR_FORMAT = 3,           /* a file's content is malformed or does not match the model */
  BC_ERR_UNSUPPORTED = 4,      /* a valid request this build or model cannot serve (e.g. the CUDA backend) */
  BC_ERR_OUT_OF_MEMORY = 5,    /* not enough memory */
  BC_ERR_DEVICE = 6,           /* a device (GPU) failed */
  BC_ERR_CANCELLED = 7,        /* the block callback returned non-zero, or the stream was closed */
  BC_ERR_INTERNAL = 8,         /* a bug in the library (including a caught panic) */
  BC_ERR_TIMEOUT = 9           /* bc_stream_next: no block within the timeout; not a failure, the
                                  stream goes on */
} bc_status;

/* Options of bc_engine_open. Get defaults from bc_engine_options_default(). */
typedef struct {
  uint32_t struct_size;   /* sizeof(bc_engine_options) */
  const char *backend;    /* "cpu", "cuda" or NULL = best available (CUDA when a driver, cuBLASLt
                             and the kernels are present, else the CPU) */
  const int32_t *devices; /* device ordinals to use; NULL/0 = the default device. With the CPU
                             backend, {0, 1, ..., n-1} runs n worker threads as devices (the
                             window's members are spread over them; same latents); any
                             other list is BC_ERR_INVALID_ARGUMENT. */
  uint32_t n_devices;     /* number of entries in devices */
  /* Added after the first version (a struct_size ending at n_devices is still accepted, with
     these NULL): */
  const char *text_encoder; /* umT5 text encoder for the *_prompt_text functions: a folder of
                               safetensors (Wan or Hugging Face names) or one file; NULL = none
                               (the built-in model has a built-in one) */
  const char *tokenizer;    /* its tokenizer.json; NULL = in the encoder's folder or its
                               tokenizer/ subfolder */
  /* Added later (a struct_size ending at tokenizer is still accepted, with this NULL): */
  const char *text_encoder_device; /* where the text encoder runs: "cpu", "cuda" (bf16 weights
                                      on the DiT's first GPU: devices[0], else BC_CUDA_DEVICE)
                                      or NULL = where the backend runs; "cpu" keeps the GPU's
                                      memory for the DiT */
  /* Added later (a struct_size ending at text_encoder_device is still accepted, with this
     NULL): */
  const char *decoder_device; /* where the decoders of bc_session_set_decoder and of streams'
                                 want_pixels run: "cpu", "cuda" (the decoder kernels on the
                                 DiT's first GPU, on a stream of their own, overlapping the
                                 DiT; only the frames come back to the host) or NULL = where
                                 the backend runs; "cpu" keeps the GPU's memory for the DiT.
                                 "cuda" without a usable GPU is BC_ERR_DEVICE */
  /* Added later (a struct_size ending at decoder_device is still accepted, with this NULL): */
  const char *text_encoder_precision; /* the text encoder's arithmetic on the CPU: "exact" (f32,
                                         the reference) or "bf16" (bf16 activations rounded as
                                         Wan's bf16 module rounds them, products summed in f32:
                                         what upstream computes, faster, ~1e-2 from exact);
                                         NULL = "exact". The CUDA encoder has its own (bf16 GEMM
                                         operands) and does not read it */
} bc_engine_options;

/* Options of bc_session_open. Get defaults from bc_session_options_default(). */
typedef struct {
  uint32_t struct_size;   /* sizeof(bc_session_options) */
  uint32_t height, width; /* latent height and width: positive, even, at most 16384 (default 8 x 12) */
  uint32_t block_frames;  /* latent frames per block, 1..4096 (default 3) */
  uint32_t lag;           /* 0 = sequential Self-Forcing schedule (default); 1..S = Block
                             Cascading with this lag (S = 4 denoising steps) */
  uint32_t bidirectional; /* 0 = causal (default); 1 = denoising members of a cascade window
                             also see later members */
  int32_t local_attn;     /* -1 = global attention (default); > 0 = local window in frames */
  uint32_t sink;          /* sink frames kept visible with local attention (default 0) */
  uint64_t seed;          /* seed of the noise and of the default prompt (default 0) */
} bc_session_options;

/* Called once per finished block, in order; latents are [frames][channels][height][width] f32,
   valid only during the call. Return non-zero to stop generation (bc_session_generate then
   returns BC_ERR_CANCELLED). `user` is the pointer given to bc_session_generate.
   The callback runs on the thread that called bc_session_generate. It may call any function on
   other handles; on its own session every call but bc_session_close fails as busy
   (BC_ERR_INVALID_ARGUMENT), and bc_session_close invalidates the handle at once while the
   running generation finishes normally. */
typedef int32_t (*bc_block_callback)(void *user, uint32_t block_index, const float *latents,
                                     uint32_t frames, uint32_t channels, uint32_t height,
                                     uint32_t width);

/* The library version, e.g. "0.1.0". Static storage; never NULL. */
const char *bc_version(void);

/* The message of the last failed call on this thread, or "" if none has failed. Never NULL.
   Successful calls do not clear it. The string stays valid until the next call into the
   library on this thread; copy it to keep it. */
const char *bc_last_error(void);

/* Default engine options: struct_size set, backend NULL (best available), no devices. */
bc_engine_options bc_engine_options_default(void);

/* Default session options: struct_size set, 8 x 12 latents, 3 frames per block, sequential
   (lag 0), causal, global attention (local_attn -1), sink 0, seed 0. */
bc_session_options bc_session_options_default(void);

/* Opens a model. `model_dir` is a folder with config.json and safetensors weights, or NULL for
   the built-in tiny model (random weights, for tests and examples). `opts` may be NULL for the
   defaults. On success writes a new handle to *out; close it with bc_engine_close.
   Errors: BC_ERR_INVALID_ARGUMENT (out NULL, bad options, unknown backend or device),
   BC_ERR_DEVICE (backend "cuda" without a usable driver or cuBLASLt), BC_ERR_UNSUPPORTED
   (backend "cuda" in a build without kernels), BC_ERR_IO / BC_ERR_FORMAT (model files). */
bc_status bc_engine_open(const char *model_dir /* NULL = built-in tiny model */,
                         const bc_engine_options *opts /* NULL = defaults */, bc_engine **out);

/* Closes an engine handle. NULL is a no-op; an unknown or already closed handle is ignored.
   Sessions opened from the engine stay valid (see Lifetimes). */
void bc_engine_close(bc_engine *engine);

/* Opens a session on an engine. `opts` may be NULL for the defaults. The options are validated
   here. The session's prompt is the built-in prompt for its seed until bc_session_set_prompt.
   On success writes a new handle to *out; close it with bc_session_close.
   Errors: BC_ERR_INVALID_ARGUMENT (NULL/closed engine, out NULL, bad options). */
bc_status bc_session_open(bc_engine *engine, const bc_session_options *opts, bc_session **out);

/* Sets the prompt: `embeds` is [rows][cols] f32 row-major (the text encoder's output), with
   cols equal to the model's text_dim (see bc_engine_get_info) and 1 <= rows <= text_len.
   Removes the prompt switches added by bc_session_switch_prompt. The values are copied.
   Errors: BC_ERR_INVALID_ARGUMENT (NULL/closed session, embeds NULL, wrong width, too many
   rows, NaN or infinite values). */
bc_status bc_session_set_prompt(bc_session *s, const float *embeds, uint32_t rows, uint32_t cols);

/* Generates n_blocks (>= 1) blocks of block_frames latent frames and calls cb for each one as
   soon as it is final, in order (block_index 0, 1, ...). Each call starts a new video from
   scratch with the session's seed, noise and prompts: calling it twice with the same session
   state yields the same latents. Returns BC_OK after the last block.
   Errors: BC_ERR_INVALID_ARGUMENT (NULL/closed/busy session, cb NULL, n_blocks 0, a prompt
   switch at or after n_blocks, recorded noise too short), BC_ERR_CANCELLED (cb returned
   non-zero; no further callback is made), BC_ERR_DEVICE / BC_ERR_OUT_OF_MEMORY (with a decoder
   on a GPU, bc_engine_options.decoder_device: the GPU cannot be used, or the decoder's weights
   and causal state do not fit, found before anything is generated; its activations are
   allocated at the first block, so not fitting those ends the call with this error after
   that block's latents), BC_ERR_INTERNAL. */
bc_status bc_session_generate(bc_session *s, uint32_t n_blocks, bc_block_callback cb, void *user);

/* Closes a session. NULL is a no-op; an unknown or already closed handle is ignored. */
void bc_session_close(bc_session *s);

/* ---- Extensions (not in the first version of the API) ---- */

/* Model facts a client needs, e.g. the prompt width. */
typedef struct {
  uint32_t struct_size; /* set by the caller to sizeof(bc_engine_info) */
  uint32_t dim;         /* hidden size */
  uint32_t num_layers;  /* transformer blocks */
  uint32_t num_heads;   /* attention heads */
  uint32_t text_dim;    /* width (cols) of prompt embeddings */
  uint32_t text_len;    /* maximum prompt rows */
  uint32_t channels;    /* latent channels (16) */
  uint32_t num_steps;   /* denoising steps S (the maximum lag) */
} bc_engine_info;

/* Fills *info (whose struct_size the caller sets) with facts about the engine's model.
   Errors: BC_ERR_INVALID_ARGUMENT (NULL/closed engine, info NULL, wrong struct_size). */
bc_status bc_engine_get_info(const bc_engine *engine, bc_engine_info *info);

/* Switches the prompt from block `block` (>= 1, counted from the start of each
   bc_session_generate call) on: blocks before it use the earlier prompt. The cross-attention
   of the new prompt applies from the switch on; the KV cache is kept (no recache). Adding a
   switch at a block that already has one replaces it. Same embeds rules as
   bc_session_set_prompt. Errors: BC_ERR_INVALID_ARGUMENT. */
bc_status bc_session_switch_prompt(bc_session *s, uint32_t block, const float *embeds,
                                   uint32_t rows, uint32_t cols);

/* Uses noise recorded in a safetensors file (tensors `noise` [F,16,H,W] and `renoise`
   [F,S-1,16,H,W]) instead of the seeded generator, so that results can be compared with other
   implementations exactly; generations are then limited to F / block_frames blocks. NULL path
   goes back to seeded noise. The file is read during the call.
   Errors: BC_ERR_INVALID_ARGUMENT, BC_ERR_IO, BC_ERR_FORMAT (missing tensors, wrong shapes for
   the session's height, width and steps, NaN). */
bc_status bc_session_set_noise_file(bc_session *s, const char *path);

/* Sets the prompt as text (UTF-8, NUL-terminated), encoded by the engine's text encoder
   (bc_engine_options.text_encoder) to at most the model's text_len tokens, as Wan cleans and
   tokenizes it; a blank text is the end-of-text token alone. Removes the prompt switches, like
   bc_session_set_prompt. Encodings are cached per text in the engine.
   Errors: BC_ERR_INVALID_ARGUMENT (NULL/closed session, text NULL or not valid UTF-8, no text
   encoder). */
bc_status bc_session_set_prompt_text(bc_session *s, const char *utf8);

/* bc_session_switch_prompt with a text prompt (same rules as bc_session_set_prompt_text). */
bc_status bc_session_switch_prompt_text(bc_session *s, uint32_t block, const char *utf8);

/* Called once per decoded block, in order, with its pixel frames: rgb is
   [frames][height][width][3] 8-bit RGB, pixels the same frames as f32 [frames][3][height][width]
   (the decoder's exact output, about [-1, 1]; on a GPU, bc_engine_options.decoder_device, the
   bf16 device decoder's, within about 2e-2 of the CPU's); both valid only during the call. Return non-zero
   to stop the generation (bc_session_generate then returns BC_ERR_CANCELLED).
   It runs on a decode thread of the library, so that decoding overlaps the generation of later
   blocks: never at the same time as itself, but possibly at the same time as the block callback
   (guard shared state). bc_session_generate returns only after the last call has returned. */
typedef int32_t (*bc_frames_callback)(void *user, uint32_t block_index, const uint8_t *rgb,
                                      const float *pixels, uint32_t frames, uint32_t height,
                                      uint32_t width);

/* Decodes every block that bc_session_generate makes with the decoder at `path` (the Wan2.1
   VAE or TAEHV, a safetensors file or a folder holding one; the kind is detected from the tensor
   names; NULL = a built-in tiny random TAEHV-shaped decoder, whose pixels are noise-like) and
   hands the pixels to cb with `user`. cb NULL removes the decoder. The engine loads each file
   once: its sessions share that decoder and its weights on the device. Over F latent frames the Wan
   VAE gives T = 1 + 4(F-1) frames and TAEHV T = 4F - 3 (it drops its first 3).
   Errors: BC_ERR_INVALID_ARGUMENT (NULL/closed/busy session, a latent size the decoder cannot
   take), BC_ERR_IO / BC_ERR_FORMAT (the decoder's file). */
bc_status bc_session_set_decoder(bc_session *s, const char *path, bc_frames_callback cb,
                                 void *user);

/* Statistics of the last successful bc_session_generate call on a session. */
typedef struct {
  uint32_t struct_size;         /* set by the caller to sizeof(bc_session_stats) */
  uint32_t blocks;              /* blocks generated */
  uint64_t ticks;               /* cascade ticks (joint forwards over a window) */
  uint64_t forward_passes;      /* model forwards */
  uint64_t max_cache_bytes;     /* largest KV cache size seen */
  double time_to_first_block;   /* seconds until block 0 was final */
  double total_seconds;         /* wall-clock seconds of the call */
} bc_session_stats;

/* Fills *stats (whose struct_size the caller sets) with the statistics of the last
   successful generation. Errors: BC_ERR_INVALID_ARGUMENT (NULL/closed session, stats NULL,
   wrong struct_size, no generation has succeeded yet on this session). */
bc_status bc_session_last_stats(const bc_session *s, bc_session_stats *stats);

/* ---- Live streams ----
 *
 * A stream is an open-ended generation on a session: blocks are made on a worker thread of the
 * library, without end, and taken one at a time with bc_stream_next. The prompt can be switched
 * while it runs, from any thread. See docs/streams.md.
 *
 * - Memory stays bounded: the session needs local attention (bc_session_options.local_attn > 0;
 *   global attention is BC_ERR_INVALID_ARGUMENT at bc_stream_open). At most queue_blocks
 *   finished blocks wait for the consumer; when the queue is full the engine waits, so a slow
 *   consumer slows the engine down.
 * - A session with an open stream is busy: every other call on it fails with
 *   BC_ERR_INVALID_ARGUMENT until the stream is closed (bc_session_close is allowed: the stream
 *   keeps working, and keeps the model alive).
 * - The stream starts from the session's seed (or recorded noise: the stream then fails when it
 *   runs out), options and prompt (bc_session_set_prompt / _text); the switches of
 *   bc_session_switch_prompt do not apply to streams: use bc_stream_switch_prompt.
 * - Threads: bc_stream_next is called by one thread at a time (a second concurrent call fails
 *   as busy); bc_stream_switch_prompt, bc_stream_switch_prompt_text and bc_stream_close may be
 *   called from any thread, also while another thread waits in bc_stream_next. */

/* A live stream. Create with bc_stream_open, destroy with bc_stream_close. */
typedef struct bc_stream bc_stream;

/* Options of bc_stream_open. Get defaults from bc_stream_options_default(). */
typedef struct {
  uint32_t struct_size;  /* sizeof(bc_stream_options) */
  uint32_t queue_blocks; /* finished blocks that may wait for bc_stream_next, 1..1024 (default 2) */
  double target_fps;     /* release blocks at this many frames per second (pixel frames with
                            want_pixels, latent frames otherwise); 0 = as fast as the engine
                            goes (default); else 1e-6..1e6. A late engine is not made to
                            catch up in a burst. */
  uint32_t want_pixels;  /* 1 = decode each block to RGB8 (rgb in bc_stream_block) with the
                            session's decoder (bc_session_set_decoder; its frames callback is not
                            called) or, without one, the built-in tiny random TAEHV; 0 = latents
                            only (default) */
  /* Added in the second version (struct_size 32; the first, 24, ends here: its fields below
     take their defaults). */
  uint32_t reserved;     /* ignored (the first version's padding); set to 0 */
  uint32_t want_latents; /* 1 = bc_stream_next hands out each block's latents (default); 0 =
                            frames only (needs want_pixels = 1): the block's latents pointer is
                            NULL and frames/channels/height/width are 0, and when the decoder
                            runs on the DiT's CUDA device only the RGB8 frames cross to the
                            host (the latents go from the DiT to the decoder on the device) */
} bc_stream_options;

/* Default stream options: struct_size set, queue 2, unpaced (fps 0), no pixels, latents. */
bc_stream_options bc_stream_options_default(void);

/* Starts a stream on a session. `opts` may be NULL for the defaults. On success writes a new
   handle to *out; close it with bc_stream_close.
   Errors: BC_ERR_INVALID_ARGUMENT (NULL/closed/busy session, a session that already has an open
   stream, out NULL, bad options, a session with global attention), BC_ERR_OUT_OF_MEMORY
   (want_pixels with the decoder's weights or causal state not fitting on its GPU; its
   activations are allocated at the first block, and not fitting those ends the stream with
   this error from bc_stream_next), BC_ERR_DEVICE (want_pixels with the decoder on a GPU that
   cannot be used). An
   engine failure after the start (e.g. a device error) is reported by bc_stream_next. */
bc_status bc_stream_open(bc_session *s, const bc_stream_options *opts, bc_stream **out);

/* One finished block, filled by bc_stream_next. The caller sets struct_size. */
typedef struct {
  uint32_t struct_size;   /* set by the caller to sizeof(bc_stream_block) */
  uint64_t block_index;   /* 0, 1, 2, ... in order */
  const float *latents;   /* [frames][channels][height][width] f32, or NULL without
                             want_latents (frames, channels, height, width are then 0) */
  uint32_t frames, channels, height, width;
  const uint8_t *rgb;     /* [pixel_frames][pixel_height][pixel_width][3] 8-bit RGB, or NULL
                             without want_pixels (pixel_* are then 0). A block of F latent
                             frames gives 4F pixel frames, the stream's first block 4F-3 (both
                             decoders). */
  uint32_t pixel_frames, pixel_height, pixel_width;
} bc_stream_block;

/* Takes the next finished block, waiting up to timeout_ms milliseconds (-1 = as long as it
   takes, 0 = do not wait). On BC_OK *out describes the block; its pointers are owned by the
   stream and stay valid until the next bc_stream_next or bc_stream_close on this stream.
   Every call (whatever its result) releases the previous block.
   Returns BC_ERR_TIMEOUT when no block came in time (the stream goes on), BC_ERR_CANCELLED
   when the stream is closed by another thread while this call waits.
   Errors: BC_ERR_INVALID_ARGUMENT (NULL/closed stream, out NULL, wrong struct_size, timeout_ms
   below -1, another thread already in bc_stream_next on this stream, a stream that has ended
   after an error), or the engine's error (BC_ERR_DEVICE, BC_ERR_OUT_OF_MEMORY, ...; reported
   once, after the blocks finished before it; the stream has then ended). */
bc_status bc_stream_next(bc_stream *st, int32_t timeout_ms, bc_stream_block *out);

/* Switches the prompt (same embeds rules as bc_session_set_prompt) from the next block to
   start on, and writes that block's index to *applies_from (NULL: not written): blocks before
   it keep the old prompt, that block and the later ones use the new one. Blocks already in
   flight keep their prompt (the KV cache is kept). A second switch before that block starts
   replaces the first. Safe from any thread, also while another waits in bc_stream_next.
   Errors: BC_ERR_INVALID_ARGUMENT (NULL/closed stream, bad embeds), BC_ERR_CANCELLED (the
   stream has stopped). */
bc_status bc_stream_switch_prompt(bc_stream *st, const float *embeds, uint32_t rows,
                                  uint32_t cols, uint64_t *applies_from);

/* bc_stream_switch_prompt with a UTF-8 text prompt, encoded by the engine's text encoder on
   the stream's own lower-priority threads while the call waits; the stream goes on meanwhile.
   The latest call wins: a call overtaken by a later one (whose encode finished first) writes
   the block the later one applies from, and its own prompt applies to no block. Errors: as
   bc_stream_switch_prompt, and BC_ERR_INVALID_ARGUMENT for a NULL or invalid UTF-8 text or an
   engine without a text encoder. */
bc_status bc_stream_switch_prompt_text(bc_stream *st, const char *utf8, uint64_t *applies_from);

/* Stops and closes a stream; frees its blocks and makes its session usable again. A thread
   waiting in bc_stream_next on it returns BC_ERR_CANCELLED. NULL is a no-op; an unknown or
   already closed handle is ignored. Waits for the worker to finish its current tick unless
   another thread is still inside bc_stream_next (that call then does). */
void bc_stream_close(bc_stream *st);

#ifdef __cplusplus
}
#endif

#endif /* BLOCKCASCADE_H */
