/*
 * live.c — a live stream from blockcascade's built-in tiny model, whose prompt a second thread
 * switches while the main thread takes blocks; then a stream closed from another thread while
 * the main thread waits for its next block.
 *
 *   live [OUT.f32 [N_BLOCKS [SEED [LAG [PIXELS]]]]]
 *
 * Opens the built-in model (with its built-in tiny text encoder), a session with local
 * attention (a stream needs it: its memory stays bounded), and a stream. The main thread takes
 * N_BLOCKS blocks (default 10), prints one line per block and writes the latents as raw
 * little-endian f32 [frames][16][H][W] to OUT. Once it has taken block 0, a second thread
 * switches the prompt to the text "a red fox" and prints the block the switch applies from.
 * PIXELS = 1 also decodes each block (the built-in tiny decoder: noise-like frames).
 *
 * Build (after `cargo build --release`):
 *   cc -pthread ffi/examples/live.c -Iffi/include target/release/libblockcascade.a \
 *      -lstdc++ -lgcc_s -lutil -lrt -lpthread -lm -ldl -o live
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "blockcascade.h"

/* What the main thread and the switching thread share. */
struct shared {
  pthread_mutex_t lock;
  pthread_cond_t cond;
  bc_stream *stream;
  uint64_t taken;        /* blocks the main thread has taken */
  uint64_t applies_from; /* set by the switching thread */
  bc_status status;      /* of the switch */
};

static void *switcher(void *arg) {
  struct shared *sh = (struct shared *)arg;
  uint64_t at = 0;
  pthread_mutex_lock(&sh->lock);
  while (sh->taken < 1) pthread_cond_wait(&sh->cond, &sh->lock);
  pthread_mutex_unlock(&sh->lock);
  /* The main thread may be waiting in bc_stream_next right now: switching is safe anyway. */
  bc_status st = bc_stream_switch_prompt_text(sh->stream, "a red fox", &at);
  if (st != BC_OK) fprintf(stderr, "live: switch failed (%d): %s\n", (int)st, bc_last_error());
  else printf("switch: \"a red fox\" applies from block %llu\n", (unsigned long long)at);
  fflush(stdout);
  pthread_mutex_lock(&sh->lock);
  sh->applies_from = at;
  sh->status = st;
  pthread_mutex_unlock(&sh->lock);
  return NULL;
}

static void *closer(void *arg) {
  const struct timespec pause = {0, 50 * 1000 * 1000};
  nanosleep(&pause, NULL);
  bc_stream_close((bc_stream *)arg);
  return NULL;
}

#define CHECK(call)                                                                   \
  do {                                                                                \
    bc_status st_ = (call);                                                           \
    if (st_ != BC_OK) {                                                               \
      fprintf(stderr, "live: %s failed (%d): %s\n", #call, (int)st_, bc_last_error()); \
      goto done;                                                                      \
    }                                                                                 \
  } while (0)

int main(int argc, char **argv) {
  const char *out_path = argc > 1 ? argv[1] : NULL;
  uint64_t n_blocks = argc > 2 ? strtoull(argv[2], NULL, 10) : 10;
  uint64_t seed = argc > 3 ? strtoull(argv[3], NULL, 10) : 0;
  uint32_t lag = argc > 4 ? (uint32_t)strtoul(argv[4], NULL, 10) : 0;
  uint32_t pixels = argc > 5 ? (uint32_t)strtoul(argv[5], NULL, 10) : 0;
  FILE *out = NULL;
  int rc = 1, started = 0;
  bc_engine *engine = NULL;
  bc_session *session = NULL;
  bc_stream *paced = NULL;
  pthread_t thread;
  struct shared sh;
  memset(&sh, 0, sizeof sh);
  pthread_mutex_init(&sh.lock, NULL);
  pthread_cond_init(&sh.cond, NULL);

  if (out_path && !(out = fopen(out_path, "wb"))) {
    perror(out_path);
    return 1;
  }
  bc_engine_options eopts = bc_engine_options_default();
  eopts.backend = "cpu";
  CHECK(bc_engine_open(NULL, &eopts, &engine));
  bc_session_options sopts = bc_session_options_default();
  sopts.seed = seed;
  sopts.lag = lag;
  sopts.local_attn = 6; /* frames: two blocks of 3 */
  CHECK(bc_session_open(engine, &sopts, &session));

  bc_stream_options opts = bc_stream_options_default();
  opts.queue_blocks = 1; /* at most 1 finished block waits for us */
  opts.want_pixels = pixels;
  CHECK(bc_stream_open(session, &opts, &sh.stream));
  if (bc_session_generate(session, 1, NULL, NULL) == BC_OK) {
    fprintf(stderr, "live: a session with an open stream must be busy\n");
    goto done;
  }
  if (pthread_create(&thread, NULL, switcher, &sh) != 0) {
    fprintf(stderr, "live: cannot start the switching thread\n");
    goto done;
  }
  started = 1;

  for (uint64_t i = 0; i < n_blocks; i++) {
    bc_stream_block b;
    memset(&b, 0, sizeof b);
    b.struct_size = sizeof b;
    CHECK(bc_stream_next(sh.stream, -1, &b));
    size_t n = (size_t)b.frames * b.channels * b.height * b.width;
    printf("block %llu: %u frames x %u channels x %u x %u, %u pixel frames of %u x %u%s\n",
           (unsigned long long)b.block_index, b.frames, b.channels, b.height, b.width,
           b.pixel_frames, b.pixel_width, b.pixel_height, b.rgb ? "" : " (no pixels)");
    fflush(stdout);
    if (b.block_index != i) {
      fprintf(stderr, "live: block %llu arrived, expected %llu\n",
              (unsigned long long)b.block_index, (unsigned long long)i);
      goto done;
    }
    if (b.rgb) {
      /* Touch every byte: the buffer stays valid until the next bc_stream_next. */
      unsigned long sum = 0;
      for (size_t k = 0; k < (size_t)b.pixel_frames * b.pixel_height * b.pixel_width * 3; k++)
        sum += b.rgb[k];
      printf("  rgb checksum %lu\n", sum);
    }
    if (out && fwrite(b.latents, sizeof(float), n, out) != n) {
      perror("live: write");
      goto done;
    }
    pthread_mutex_lock(&sh.lock);
    sh.taken = i + 1;
    pthread_cond_broadcast(&sh.cond);
    pthread_mutex_unlock(&sh.lock);
  }
  pthread_join(thread, NULL);
  started = 0;
  if (sh.status != BC_OK || sh.applies_from >= n_blocks) {
    fprintf(stderr, "live: the switch did not land within the %llu blocks taken\n",
            (unsigned long long)n_blocks);
    goto done;
  }
  bc_stream_close(sh.stream);
  sh.stream = NULL;

  /* A stream paced at one frame per 1000 s: after block 0 the next one is far away, and a
     close from another thread ends the wait with BC_ERR_CANCELLED. */
  opts = bc_stream_options_default();
  opts.target_fps = 0.001;
  CHECK(bc_stream_open(session, &opts, &paced));
  bc_stream_block b;
  memset(&b, 0, sizeof b);
  b.struct_size = sizeof b;
  CHECK(bc_stream_next(paced, -1, &b));
  if (bc_stream_next(paced, 10, &b) != BC_ERR_TIMEOUT) {
    fprintf(stderr, "live: expected a timeout\n");
    goto done;
  }
  if (pthread_create(&thread, NULL, closer, paced) != 0) goto done;
  bc_status st = bc_stream_next(paced, -1, &b);
  pthread_join(thread, NULL);
  paced = NULL; /* closed by the other thread */
  if (st != BC_ERR_CANCELLED) {
    fprintf(stderr, "live: a close from another thread gave %d, not BC_ERR_CANCELLED\n", (int)st);
    goto done;
  }
  printf("closed from another thread while waiting: BC_ERR_CANCELLED\n");
  /* The session is free again. */
  CHECK(bc_session_set_prompt_text(session, "a blue bird"));
  rc = 0;

done:
  if (started) {
    /* An error before the switch: let the switching thread go on and finish. */
    pthread_mutex_lock(&sh.lock);
    sh.taken = 2;
    pthread_cond_broadcast(&sh.cond);
    pthread_mutex_unlock(&sh.lock);
    pthread_join(thread, NULL);
  }
  bc_stream_close(sh.stream); /* NULL is fine */
  bc_stream_close(paced);
  bc_session_close(session);
  bc_engine_close(engine);
  pthread_mutex_destroy(&sh.lock);
  pthread_cond_destroy(&sh.cond);
  if (out && fclose(out) != 0) {
    perror(out_path);
    rc = 1;
  }
  return rc;
}
