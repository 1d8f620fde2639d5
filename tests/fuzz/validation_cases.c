/* Every branch of validate() in csrc/sgmv.c, with its status and exact message, then sgmv_expand
 * from 8 threads at once (the driver's pthread_once, the thread-local last error). Linked against
 * the ASan + UBSan build of tests/test_sanitizers.py, where no driver can load (no_driver.c):
 * arguments that pass validation stop at SGMV_ERROR_NO_DRIVER. Device pointers are fake and point
 * into a PROT_NONE reservation, so any access through them faults. */
#define _DEFAULT_SOURCE /* pthread barriers, MAP_ANONYMOUS under -std=c11 */
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "sgmv.h"

#define INVALID SGMV_ERROR_INVALID_ARGUMENT
#define DTYPE SGMV_ERROR_UNSUPPORTED_DTYPE
#define FP16 SGMV_DTYPE_FLOAT16
#define BF16 SGMV_DTYPE_BFLOAT16
#define FP32 SGMV_DTYPE_FLOAT32
#define I32 SGMV_DTYPE_INT32
#define I64 SGMV_DTYPE_INT64
#define NO_DRIVER_MSG "no CUDA driver: cannot load libcuda.so.1 ("
/* What the message lists: with weights of a served dtype, its (inputs, output) pairs; else the served weights. */
#define SERVED_WITH(w) "(" w ", " w "), (" w ", float32), (float32, " w "), (float32, float32)"
#define SERVED_FP8 "(float16, float16), (float16, float32), (bfloat16, bfloat16), (bfloat16, float32)"
#define SERVED_WEIGHTS "float16, bfloat16, float8_e4m3fn"

static unsigned char *reserved; /* PROT_NONE */
static int failures, cases;

static void *fake(int i) { return reserved + 4096 * i; }

/* The arguments of tests/test_capi.py's valid_args(): they pass validation. */
static sgmv_expand_args_t valid(void) {
  sgmv_expand_args_t a = SGMV_EXPAND_ARGS_INIT;
  a.inputs = fake(1);
  a.inputs_dtype = FP16;
  a.inputs_row_stride = 16;
  a.weights = fake(2);
  a.weights_dtype = FP16;
  a.weights_lora_stride = 64 * 16;
  a.weights_row_stride = 16;
  a.output = fake(3);
  a.output_dtype = FP16;
  a.output_row_stride = 64;
  a.total_tokens = 10;
  a.hidden = 64;
  a.rank = 16;
  a.num_loras = 2;
  a.seq_start = fake(4);
  a.seq_len = fake(5);
  a.lora_indices = fake(6);
  a.metadata_dtype = I32;
  a.batches = 2;
  a.max_seq_length = 5;
  a.add_inputs = 1;
  return a;
}

/* A formatted string; a few live at once. */
static const char *f(const char *fmt, ...) {
  static char bufs[4][512];
  static int next;
  char *b = bufs[next++ % 4];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(b, 512, fmt, ap);
  va_end(ap);
  return b;
}

/* want_msg: the exact message; for NO_DRIVER, its prefix; for SUCCESS, NULL (the message stays). */
static void expect(int line, const char *before, sgmv_status_t got, sgmv_status_t want, const char *want_msg) {
  const char *msg = sgmv_last_error();
  int ok = got == want;
  if (want == SGMV_SUCCESS) ok = ok && strcmp(msg, before) == 0;
  else if (want == SGMV_ERROR_NO_DRIVER) ok = ok && strncmp(msg, want_msg, strlen(want_msg)) == 0;
  else ok = ok && strcmp(msg, want_msg) == 0;
  cases++;
  if (!ok) {
    printf("validation_cases: FAILED line %d: status %d \"%s\", expected %d \"%s\"\n", line, got, msg, want,
           want == SGMV_SUCCESS ? before : want_msg);
    failures++;
  }
}

/* CASE(status, message, changes to valid()...): calls sgmv_expand and checks status and message. */
#define CASE(want, want_msg, ...)                                \
  do {                                                           \
    sgmv_expand_args_t a = valid();                              \
    __VA_ARGS__;                                                 \
    char before_[512];                                           \
    snprintf(before_, sizeof before_, "%s", sgmv_last_error());  \
    expect(__LINE__, before_, sgmv_expand(&a), want, want_msg);  \
  } while (0)
#define OK(...) CASE(SGMV_ERROR_NO_DRIVER, NO_DRIVER_MSG, __VA_ARGS__) /* passes validation */
#define NOOP(...) CASE(SGMV_SUCCESS, NULL, __VA_ARGS__)

static const char *dtype_msg(const char *x, const char *w, const char *o, const char *m) {
  if (strcmp(m, "int32") && strcmp(m, "int64"))
    return f("sgmv_expand: args->metadata_dtype is %s: metadata are int32 or int64", m);
  const char *pairs = !strcmp(w, "float16") ? SERVED_WITH("float16") : !strcmp(w, "bfloat16") ? SERVED_WITH("bfloat16")
                      : !strcmp(w, "float8_e4m3fn") ? SERVED_FP8 : NULL;
  if (!pairs)
    return f("sgmv_expand: unsupported dtypes (args->inputs_dtype %s, args->weights_dtype %s, args->output_dtype %s): "
             "served weights: " SERVED_WEIGHTS, x, w, o);
  return f("sgmv_expand: unsupported dtypes (args->inputs_dtype %s, args->weights_dtype %s, args->output_dtype %s): "
           "served with %s weights (inputs, output): %s", x, w, o, w, pairs);
}

static void validation(void) {
  const size_t size = sizeof(sgmv_expand_args_t);
  const char *negative_fmt = "sgmv_expand: args->%s must be >= 0, got %lld";
  const char *overflow_fmt = "sgmv_expand: args->%s %lld is so large that element offsets overflow int64";

  expect(__LINE__, "", sgmv_expand(NULL), INVALID, "sgmv_expand: args is NULL");
  OK();

  /* struct_size: version 0.1's struct (without batch_plan) and today's are served, the fields a
   * 0.1 caller lacks taking their defaults (a bad batch_plan past its struct_size is not read);
   * smaller, and a newer header's larger struct, are rejected with their own messages. */
  const size_t v0_1 = offsetof(sgmv_expand_args_t, stream) + sizeof(sgmv_stream_t);
  const char *small_fmt = "sgmv_expand: args->struct_size is %zu, smaller than any version of sgmv_expand_args_t: "
                          "initialise it with SGMV_EXPAND_ARGS_INIT";
  const char *newer_fmt = "sgmv_expand: args->struct_size is %zu: the caller was built against a newer sgmv.h than "
                          "this libsgmv %d.%d.%d (struct size %zu); update libsgmv";
  CASE(INVALID, f(small_fmt, (size_t)0), a.struct_size = 0);
  CASE(INVALID, f(small_fmt, (size_t)8), a.struct_size = 8);
  CASE(INVALID, f(small_fmt, v0_1 - 1), a.struct_size = v0_1 - 1);
  OK(a.struct_size = v0_1, a.batch_plan = (const void *)1, a.batch_plan_bytes = 3);
  OK(a.struct_size = size);
  CASE(INVALID, f(newer_fmt, size + 64, SGMV_VERSION_MAJOR, SGMV_VERSION_MINOR, SGMV_VERSION_PATCH, size),
       a.struct_size = size + 64);
  CASE(INVALID, f(newer_fmt, (size_t)SIZE_MAX, SGMV_VERSION_MAJOR, SGMV_VERSION_MINOR, SGMV_VERSION_PATCH, size),
       a.struct_size = SIZE_MAX);
  /* batch_plan: aligned and large enough, or rejected; with a plan the metadata are not read */
  const char *plan_msg = "sgmv_expand: args->batch_plan_bytes 400 is smaller than sgmv_batch_plan_bytes(2, 10) = %zu";
  CASE(INVALID, "sgmv_expand: args->batch_plan is not aligned to its element size (4 bytes)", a.batch_plan = (const char *)fake(7) + 2,
       a.batch_plan_bytes = 1 << 20);
  CASE(INVALID, f(plan_msg, sgmv_batch_plan_bytes(2, 10)), a.batch_plan = fake(7), a.batch_plan_bytes = 400);
  OK(a.batch_plan = fake(7), a.batch_plan_bytes = sgmv_batch_plan_bytes(2, 10), a.seq_start = NULL, a.seq_len = NULL,
     a.lora_indices = NULL);

  /* dtypes: every accepted combination, then each rule broken */
  for (int w = FP16; w <= BF16; w++)
    for (int x = 0; x < 2; x++)
      for (int o = 0; o < 2; o++)
        for (int m = I32; m <= I64; m++)
          OK(a.weights_dtype = w, a.inputs_dtype = x ? FP32 : w, a.output_dtype = o ? FP32 : w, a.metadata_dtype = m);
  CASE(DTYPE, dtype_msg("int32", "float16", "float16", "int32"), a.inputs_dtype = I32);
  CASE(DTYPE, dtype_msg("int64", "float16", "float16", "int32"), a.inputs_dtype = I64);
  CASE(DTYPE, dtype_msg("unknown", "float16", "float16", "int32"), a.inputs_dtype = (sgmv_dtype_t)-1);
  CASE(DTYPE, dtype_msg("unknown", "float16", "float16", "int32"), a.inputs_dtype = (sgmv_dtype_t)6);
  CASE(DTYPE, dtype_msg("float8_e4m3fn", "float16", "float16", "int32"), a.inputs_dtype = SGMV_DTYPE_FLOAT8_E4M3FN);
  CASE(DTYPE, dtype_msg("float32", "float8_e4m3fn", "float16", "int32"), a.weights_dtype = SGMV_DTYPE_FLOAT8_E4M3FN,
       a.inputs_dtype = FP32);
  CASE(DTYPE, dtype_msg("float16", "float8_e4m3fn", "bfloat16", "int32"), a.weights_dtype = SGMV_DTYPE_FLOAT8_E4M3FN,
       a.output_dtype = BF16);
  CASE(INVALID, "sgmv_expand: args->weight_scales[0].scales is NULL: float8_e4m3fn weights need scales for every slice",
       a.weights_dtype = SGMV_DTYPE_FLOAT8_E4M3FN);
  CASE(INVALID, "sgmv_expand: args->weight_scales[0].scales is set, but the weights are float16: scales are for "
       "float8_e4m3fn weights only", a.weight_scales[0].scales = fake(9));
  CASE(DTYPE, dtype_msg("float16", "float16", "int32", "int32"), a.output_dtype = I32);
  CASE(DTYPE, dtype_msg("float16", "float16", "unknown", "int32"), a.output_dtype = (sgmv_dtype_t)INT32_MAX);
  CASE(DTYPE, dtype_msg("float32", "float32", "float32", "int32"),
       a.weights_dtype = a.inputs_dtype = a.output_dtype = FP32);
  CASE(DTYPE, dtype_msg("float16", "int32", "float16", "int32"), a.weights_dtype = I32);
  CASE(DTYPE, dtype_msg("float16", "unknown", "float16", "int32"), a.weights_dtype = (sgmv_dtype_t)INT32_MIN);
  CASE(DTYPE, dtype_msg("float16", "float16", "float16", "float16"), a.metadata_dtype = FP16);
  CASE(DTYPE, dtype_msg("float16", "float16", "float16", "float32"), a.metadata_dtype = FP32);
  CASE(DTYPE, dtype_msg("float16", "float16", "float16", "unknown"), a.metadata_dtype = (sgmv_dtype_t)77);
  CASE(DTYPE, dtype_msg("bfloat16", "float16", "float16", "int32"), a.inputs_dtype = BF16);
  CASE(DTYPE, dtype_msg("float16", "float16", "bfloat16", "int32"), a.output_dtype = BF16);
  CASE(DTYPE, dtype_msg("float16", "bfloat16", "bfloat16", "int32"), a.weights_dtype = BF16, a.output_dtype = BF16);
  CASE(DTYPE, dtype_msg("float16", "float16", "int32", "int32"), a.output_dtype = I32, a.rank = 0); /* dtypes first */

  /* sizes */
  CASE(INVALID, "sgmv_expand: args->total_tokens must be in [0, 2^30), got -1", a.total_tokens = -1);
  CASE(INVALID, f("sgmv_expand: args->total_tokens must be in [0, 2^30), got %lld", (long long)INT64_MIN),
       a.total_tokens = INT64_MIN);
  CASE(INVALID, "sgmv_expand: args->total_tokens must be in [0, 2^30), got 1073741824", a.total_tokens = (int64_t)1 << 30);
  OK(a.total_tokens = ((int64_t)1 << 30) - 1);
  CASE(INVALID, "sgmv_expand: args->hidden must be in [1, 4194240], got 0", a.hidden = 0);
  CASE(INVALID, "sgmv_expand: args->hidden must be in [1, 4194240], got -5", a.hidden = -5);
  CASE(INVALID, "sgmv_expand: args->hidden must be in [1, 4194240], got 4194241", a.hidden = 4194241,
       a.output_row_stride = 4194241);
  OK(a.hidden = 4194240, a.output_row_stride = 4194240, a.num_loras = 1);
  CASE(INVALID, "sgmv_expand: args->rank must be in [1, 256], got 0", a.rank = 0);
  CASE(INVALID, "sgmv_expand: args->rank must be in [1, 256], got -1", a.rank = -1);
  CASE(INVALID, "sgmv_expand: args->rank must be in [1, 256], got 257", a.rank = 257, a.inputs_row_stride = 257,
       a.weights_row_stride = 257, a.weights_lora_stride = 64 * 257);
  OK(a.rank = 1);
  OK(a.rank = 256, a.inputs_row_stride = 256, a.weights_row_stride = 256, a.weights_lora_stride = 64 * 256);
  CASE(INVALID, "sgmv_expand: args->num_loras must be in [1, 2^31), got 0", a.num_loras = 0);
  CASE(INVALID, "sgmv_expand: args->num_loras must be in [1, 2^31), got 2147483648", a.num_loras = (int64_t)INT32_MAX + 1);
  OK(a.num_loras = INT32_MAX);
  CASE(INVALID, "sgmv_expand: args->batches must be in [0, 2^30), got -1", a.batches = -1);
  CASE(INVALID, "sgmv_expand: args->batches must be in [0, 2^30), got 1073741824", a.batches = (int64_t)1 << 30);
  OK(a.batches = ((int64_t)1 << 30) - 1);
  CASE(INVALID, "sgmv_expand: args->max_seq_length must be >= 0, got -1", a.max_seq_length = -1);
  OK(a.max_seq_length = 0);
  OK(a.max_seq_length = INT64_MAX);

  /* strides shorter than a row: checked only where there is more than one row */
  CASE(INVALID, "sgmv_expand: args->inputs_row_stride 8 is smaller than rank 16", a.inputs_row_stride = 8);
  CASE(INVALID, "sgmv_expand: args->inputs_row_stride -16 is smaller than rank 16", a.inputs_row_stride = -16);
  CASE(INVALID, "sgmv_expand: args->weights_row_stride 15 is smaller than rank 16", a.weights_row_stride = 15);
  CASE(INVALID, "sgmv_expand: args->output_row_stride 32 is smaller than hidden 64", a.output_row_stride = 32);
  OK(a.total_tokens = 1, a.inputs_row_stride = 0, a.output_row_stride = 0);
  OK(a.hidden = 1, a.weights_row_stride = 0);

  /* negative strides where no row check catches them */
  CASE(INVALID, f(negative_fmt, "inputs_row_stride", -1LL), a.total_tokens = 1, a.inputs_row_stride = -1);
  CASE(INVALID, f(negative_fmt, "weights_row_stride", -1LL), a.hidden = 1, a.weights_row_stride = -1);
  CASE(INVALID, f(negative_fmt, "output_row_stride", -1LL), a.total_tokens = 1, a.output_row_stride = -1);
  CASE(INVALID, f(negative_fmt, "weights_lora_stride", -1LL), a.weights_lora_stride = -1);
  CASE(INVALID, f(negative_fmt, "weights_lora_stride", (long long)INT64_MIN), a.num_loras = 1,
       a.weights_lora_stride = INT64_MIN);

  /* element offsets that overflow int64, each tensor; and the largest that fit */
  CASE(INVALID, f(overflow_fmt, "inputs_row_stride", 1LL << 62), a.inputs_row_stride = (int64_t)1 << 62);
  CASE(INVALID, f(overflow_fmt, "inputs_row_stride", (long long)INT64_MAX - 15), a.total_tokens = 2,
       a.inputs_row_stride = INT64_MAX - 15);
  OK(a.total_tokens = 2, a.inputs_row_stride = INT64_MAX - 16);
  CASE(INVALID, f(overflow_fmt, "output_row_stride", 1LL << 62), a.output_row_stride = (int64_t)1 << 62);
  CASE(INVALID, f(overflow_fmt, "output_row_stride", (long long)INT64_MAX - 63), a.total_tokens = 2,
       a.output_row_stride = INT64_MAX - 63);
  OK(a.total_tokens = 2, a.output_row_stride = INT64_MAX - 64);
  CASE(INVALID, f(overflow_fmt, "weights_row_stride", 1LL << 62), a.weights_row_stride = (int64_t)1 << 62);
  CASE(INVALID, f(overflow_fmt, "weights_row_stride", (long long)INT64_MAX - 15), a.hidden = 2, a.num_loras = 1,
       a.weights_row_stride = INT64_MAX - 15);
  OK(a.hidden = 2, a.num_loras = 1, a.weights_row_stride = INT64_MAX - 16);
  CASE(INVALID, f(overflow_fmt, "weights_lora_stride", 1LL << 62), a.weights_lora_stride = (int64_t)1 << 62);
  CASE(INVALID, f(overflow_fmt, "weights_lora_stride", 1LL << 33), a.num_loras = INT32_MAX,
       a.weights_lora_stride = (int64_t)1 << 33);
  OK(a.num_loras = 1, a.weights_lora_stride = INT64_MAX);

  /* adapters that overlap */
  CASE(INVALID, "sgmv_expand: args->weights_lora_stride 100 is smaller than one adapter's extent 1024",
       a.weights_lora_stride = 100);
  CASE(INVALID, "sgmv_expand: args->weights_lora_stride 1023 is smaller than one adapter's extent 1024",
       a.weights_lora_stride = 1023);
  CASE(INVALID, "sgmv_expand: args->weights_lora_stride 0 is smaller than one adapter's extent 16", a.hidden = 1,
       a.weights_row_stride = 0, a.weights_lora_stride = 0);
  OK(a.weights_lora_stride = 1024);
  OK(a.num_loras = 1, a.weights_lora_stride = 0);

  /* nothing to do: success without a driver or data pointers (the weights are always needed), but
   * only after the checks above */
  NOOP(a.batches = 0);
  NOOP(a.batches = 0, a.inputs = a.output = NULL, a.seq_start = a.seq_len = a.lora_indices = NULL);
  NOOP(a.total_tokens = 0);
  NOOP(a.total_tokens = 0, a.inputs = a.output = NULL, a.seq_start = a.seq_len = a.lora_indices = NULL);
  CASE(INVALID, "sgmv_expand: args->weights is NULL", a.batches = 0, a.weights = NULL);
  NOOP(a.total_tokens = 0, a.inputs_row_stride = 0, a.output_row_stride = 0);
  CASE(INVALID, "sgmv_expand: args->rank must be in [1, 256], got 0", a.batches = 0, a.rank = 0);
  CASE(INVALID, f(negative_fmt, "output_row_stride", -1LL), a.total_tokens = 0, a.output_row_stride = -1);
  CASE(DTYPE, dtype_msg("float16", "float16", "float16", "unknown"), a.batches = 0, a.metadata_dtype = (sgmv_dtype_t)9);

  /* null pointers, where there is work: named, before any other check */
  CASE(INVALID, "sgmv_expand: args->inputs is NULL", a.inputs = NULL);
  CASE(INVALID, "sgmv_expand: args->weights is NULL", a.weights = NULL, a.rank = 0, a.metadata_dtype = FP16);
  CASE(INVALID, "sgmv_expand: args->output is NULL", a.output = NULL);
  CASE(INVALID, "sgmv_expand: args->seq_start is NULL", a.seq_start = NULL);
  CASE(INVALID, "sgmv_expand: args->seq_len, args->lora_indices are NULL", a.seq_len = NULL, a.lora_indices = NULL);
  {
    sgmv_expand_args_t init = SGMV_EXPAND_ARGS_INIT; /* only initialised: nothing to do, but no weights */
    expect(__LINE__, "", sgmv_expand(&init), INVALID, "sgmv_expand: args->weights is NULL");
  }

  /* every data pointer at a multiple of its element size */
  const char *align_fmt = "sgmv_expand: args->%s is not aligned to its element size (%d bytes)";
  CASE(INVALID, f(align_fmt, "inputs", 4), a.inputs_dtype = FP32, a.inputs = (char *)fake(1) + 2);
  CASE(INVALID, f(align_fmt, "weights", 2), a.weights = (char *)fake(2) + 1);
  CASE(INVALID, f(align_fmt, "output", 2), a.output = (char *)fake(3) + 3);
  CASE(INVALID, f(align_fmt, "seq_len", 8), a.metadata_dtype = I64, a.seq_len = (char *)fake(5) + 4);
  CASE(INVALID, f(align_fmt, "lora_ranks", 4), a.lora_ranks = (char *)fake(6) + 2);

  /* what validation does not look at */
  OK(a.add_inputs = -7, a.stream = (sgmv_stream_t)fake(7));
  OK(a.inputs = (char *)fake(1) + 2, a.hidden = 63, a.output_row_stride = 63); /* not 16-byte: the unaligned tile */

  /* the other entry points */
  for (int s = SGMV_SUCCESS; s <= SGMV_ERROR_INTERNAL; s++) {
    cases++;
    if (strcmp(sgmv_status_string((sgmv_status_t)s), "unknown status") == 0) {
      printf("validation_cases: FAILED: status %d has no description\n", s);
      failures++;
    }
  }
  const int unknown[] = {-1, 8, 1000, INT32_MIN, INT32_MAX};
  for (int i = 0; i < 5; i++) {
    cases++;
    if (strcmp(sgmv_status_string((sgmv_status_t)unknown[i]), "unknown status") != 0) {
      printf("validation_cases: FAILED: status %d is described\n", unknown[i]);
      failures++;
    }
  }
  int count = -1, cc = -1, arch = -1;
  expect(__LINE__, "", sgmv_device_count(&count), SGMV_ERROR_NO_DRIVER, NO_DRIVER_MSG);
  cases++;
  if (count != 0) {
    printf("validation_cases: FAILED: sgmv_device_count set count %d without a driver\n", count);
    failures++;
  }
  expect(__LINE__, "", sgmv_device_count(NULL), INVALID, "sgmv_device_count: count is NULL");
  expect(__LINE__, "", sgmv_device_arch(0, &cc, &arch), SGMV_ERROR_NO_DRIVER, NO_DRIVER_MSG);
  expect(__LINE__, "", sgmv_device_arch(0, NULL, &arch), INVALID, "sgmv_device_arch: NULL output pointer");
  expect(__LINE__, "", sgmv_device_arch(-1, &cc, NULL), INVALID, "sgmv_device_arch: NULL output pointer");
}

/* ---- threads ------------------------------------------------------------------------------- */

#define THREADS 8
#define ROUNDS 2000
static pthread_barrier_t start;

/* Each thread's messages carry its own numbers: another thread's error must never show. */
static void *hammer(void *arg) {
  long id = (long)arg, bad = 0;
  pthread_barrier_wait(&start); /* all at once: the first calls race for the driver's pthread_once */
  for (int i = 0; i < ROUNDS; i++) {
    sgmv_expand_args_t a = valid();
    if (sgmv_expand(&a) != SGMV_ERROR_NO_DRIVER || strncmp(sgmv_last_error(), NO_DRIVER_MSG, strlen(NO_DRIVER_MSG)))
      bad++;
    a.batches = 0; /* a no-op keeps the message */
    if (sgmv_expand(&a) != SGMV_SUCCESS || strncmp(sgmv_last_error(), NO_DRIVER_MSG, strlen(NO_DRIVER_MSG))) bad++;
    a = valid();
    a.rank = -(id * ROUNDS + i) - 1;
    char want[128];
    snprintf(want, sizeof want, "sgmv_expand: args->rank must be in [1, 256], got %lld", (long long)a.rank);
    if (sgmv_expand(&a) != INVALID || strcmp(sgmv_last_error(), want)) bad++;
    int count = -1;
    if (sgmv_device_count(&count) != SGMV_ERROR_NO_DRIVER || count != 0) bad++;
  }
  return (void *)bad;
}

static void threads(void) {
  pthread_t t[THREADS];
  pthread_barrier_init(&start, NULL, THREADS);
  for (long i = 0; i < THREADS; i++)
    if (pthread_create(&t[i], NULL, hammer, (void *)i)) {
      printf("validation_cases: FAILED: pthread_create\n");
      exit(1);
    }
  for (int i = 0; i < THREADS; i++) {
    void *bad;
    pthread_join(t[i], &bad);
    cases++;
    if (bad) {
      printf("validation_cases: FAILED: thread %d got %ld wrong statuses or messages\n", i, (long)bad);
      failures++;
    }
  }
  pthread_barrier_destroy(&start);
}

int main(void) {
  reserved = mmap(NULL, 1 << 20, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (reserved == MAP_FAILED) return 1;
  threads(); /* first: no call has loaded the driver yet */
  validation();
  printf("validation_cases: %d cases, %d failed%s\n", cases, failures, failures ? "" : "\nvalidation_cases: ok");
  return failures ? 1 : 0;
}
