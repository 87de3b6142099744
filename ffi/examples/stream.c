/*
 * stream.c — streams video latents from blockcascade's built-in tiny model.
 *
 *   stream [OUT.f32 [N_BLOCKS [SEED [LAG]]]]
 *
 * Opens the built-in model, generates N_BLOCKS blocks (default 3) with the default session
 * options and the given seed (default 0) and lag (default 0 = sequential), prints one line per
 * finished block, and writes all latents as raw little-endian f32 [frames][16][H][W] to OUT.
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
  int rc = 1;
  bc_engine *engine = NULL;
  bc_session *session = NULL;
  struct sink sink = {NULL, 0, 0};

  printf("blockcascade %s\n", bc_version());
  if (out_path && !(sink.out = fopen(out_path, "wb"))) {
    perror(out_path);
    return 1;
  }

  bc_engine_options eopts = bc_engine_options_default();
  eopts.backend = "cpu";
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

  CHECK(bc_session_generate(session, n_blocks, on_block, &sink));
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
  return rc;
}
