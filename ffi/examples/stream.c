/*
 * stream.c — streams video latents from blockcascade's built-in tiny model.
 *
 *   stream [OUT.f32 [N_BLOCKS [SEED [LAG [VIDEO.y4m]]]]]
 *
 * Opens the built-in model, generates N_BLOCKS blocks (default 3) with the default session
 * options and the given seed (default 0) and lag (default 0 = sequential), prints one line per
 * finished block, and writes all latents as raw little-endian f32 [frames][16][H][W] to OUT.
 * With VIDEO.y4m, every block is also decoded to pixels (the built-in tiny decoder: noise-like
 * frames) and the frames are written as a YUV4MPEG2 video (4:4:4, BT.601 full range), from the
 * library's decode thread, as soon as each block is decoded.
 *
 * Build (after `cargo build --release`):
 *   cc ffi/examples/stream.c -Iffi/include target/release/libblockcascade.a \
 *      -lstdc++ -lgcc_s -lutil -lrt -lpthread -lm -ldl -o stream
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "blockcascade.h"

struct sink {
  FILE *out;
  uint32_t expected; /* next block index */
  int failed;
};

static int32_t on_block(void *user, uint32_t block_index, const float *latents, uint32_t frames,
                        uint32_t channels, uint32_t height, uint32_t width) {
  struct sink *s = (struct sink *)user;
  size_t n = (size_t)frames * channels * height * width;
  double sum = 0.0, sq = 0.0;
  for (size_t i = 0; i < n; i++) {
    sum += latents[i];
    sq += (double)latents[i] * latents[i];
  }
  printf("block %u: %u frames x %u channels x %u x %u, mean %+.6f, rms %.6f\n", block_index,
         frames, channels, height, width, sum / (double)n, n ? sqrt(sq / (double)n) : 0.0);
  fflush(stdout);
  if (block_index != s->expected) {
    fprintf(stderr, "stream: block %u arrived, expected %u\n", block_index, s->expected);
    s->failed = 1;
    return 1; /* stop */
  }
  s->expected++;
  if (s->out && fwrite(latents, sizeof(float), n, s->out) != n) {
    perror("stream: write");
    s->failed = 1;
    return 1;
  }
  return 0;
}

/* The frames callback's state: a .y4m file, written from the library's decode thread. */
struct video {
  FILE *out;
  uint32_t frames;
  int failed;
};

static uint8_t clamp_u8(double v) { return v < 0.0 ? 0 : v > 255.0 ? 255 : (uint8_t)(v + 0.5); }

static int32_t on_frames(void *user, uint32_t block_index, const uint8_t *rgb,
                         const float *pixels, uint32_t frames, uint32_t height, uint32_t width) {
  struct video *v = (struct video *)user;
  size_t plane = (size_t)height * width;
  uint8_t *yuv = malloc(3 * plane);
  (void)pixels;
  if (!yuv) {
    v->failed = 1;
    return 1;
  }
  if (v->frames == 0) fprintf(v->out, "YUV4MPEG2 W%u H%u F16:1 Ip A1:1 C444\n", width, height);
  for (uint32_t f = 0; f < frames; f++) {
    const uint8_t *px = rgb + (size_t)f * plane * 3;
    for (size_t i = 0; i < plane; i++) {
      double r = px[3 * i], g = px[3 * i + 1], b = px[3 * i + 2];
      yuv[i] = clamp_u8(0.299 * r + 0.587 * g + 0.114 * b);
      yuv[plane + i] = clamp_u8(128.0 - 0.168736 * r - 0.331264 * g + 0.5 * b);
      yuv[2 * plane + i] = clamp_u8(128.0 + 0.5 * r - 0.418688 * g - 0.081312 * b);
    }
    if (fputs("FRAME\n", v->out) < 0 || fwrite(yuv, 1, 3 * plane, v->out) != 3 * plane) {
      v->failed = 1;
      break;
    }
    v->frames++;
  }
  free(yuv);
  printf("block %u decoded: %u frames of %u x %u\n", block_index, frames, width, height);
  fflush(stdout);
  return v->failed;
}

#define CHECK(call)                                                                 \
  do {                                                                              \
    bc_status st_ = (call);                                                         \
    if (st_ != BC_OK) {                                                             \
      fprintf(stderr, "stream: %s failed (%d): %s\n", #call, (int)st_, bc_last_error()); \
      goto done;                                                                    \
    }                                                                               \
  } while (0)

int main(int argc, char **argv) {
  const char *out_path = argc > 1 ? argv[1] : NULL;
  uint32_t n_blocks = argc > 2 ? (uint32_t)strtoul(argv[2], NULL, 10) : 3;
  uint64_t seed = argc > 3 ? strtoull(argv[3], NULL, 10) : 0;
  uint32_t lag = argc > 4 ? (uint32_t)strtoul(argv[4], NULL, 10) : 0;
  const char *video_path = argc > 5 ? argv[5] : NULL;
  struct video video = {NULL, 0, 0};
  int rc = 1;
  bc_engine *engine = NULL;
  bc_session *session = NULL;
  struct sink sink = {NULL, 0, 0};

  printf("blockcascade %s\n", bc_version());
  if (out_path && !(sink.out = fopen(out_path, "wb"))) {
    perror(out_path);
    return 1;
  }
  if (video_path && !(video.out = fopen(video_path, "wb"))) {
    perror(video_path);
    if (sink.out) fclose(sink.out);
    return 1;
  }

  bc_engine_options eopts = bc_engine_options_default();
  eopts.backend = "cpu";
  /* The decoder runs where the backend runs: with "cuda" it runs on the GPU too (bf16), unless
     eopts.decoder_device = "cpu" keeps the GPU's memory for the DiT. */
  CHECK(bc_engine_open(NULL, &eopts, &engine));

  bc_engine_info info;
  memset(&info, 0, sizeof info);
  info.struct_size = sizeof info;
  CHECK(bc_engine_get_info(engine, &info));
  printf("model: dim %u, %u layers, %u heads, prompt width %u\n", info.dim, info.num_layers,
         info.num_heads, info.text_dim);

  bc_session_options sopts = bc_session_options_default();
  sopts.seed = seed;
  sopts.lag = lag;
  CHECK(bc_session_open(engine, &sopts, &session));
  /* The engine may be closed now: the session keeps the model alive. */
  bc_engine_close(engine);
  engine = NULL;

  if (video.out) CHECK(bc_session_set_decoder(session, NULL, on_frames, &video));
  CHECK(bc_session_generate(session, n_blocks, on_block, &sink));
  if (video.failed) {
    fprintf(stderr, "stream: writing %s failed\n", video_path);
    goto done;
  }
  if (sink.failed || sink.expected != n_blocks) {
    fprintf(stderr, "stream: got %u of %u blocks\n", sink.expected, n_blocks);
    goto done;
  }

  bc_session_stats stats;
  memset(&stats, 0, sizeof stats);
  stats.struct_size = sizeof stats;
  CHECK(bc_session_last_stats(session, &stats));
  printf("%u blocks in %llu ticks, %.3f s (first block after %.3f s)\n", stats.blocks,
         (unsigned long long)stats.ticks, stats.total_seconds, stats.time_to_first_block);
  rc = 0;

done:
  bc_session_close(session);
  bc_engine_close(engine);
  if (sink.out && fclose(sink.out) != 0) {
    perror(out_path);
    rc = 1;
  }
  if (video.out && fclose(video.out) != 0) {
    perror(video_path);
    rc = 1;
  }
  return rc;
}
