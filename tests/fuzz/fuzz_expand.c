/* libFuzzer harness over sgmv_expand's argument validation, with sgmv_status_string,
 * sgmv_last_error, sgmv_device_count and sgmv_device_arch. tests/test_sanitizers.py builds it:
 *
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -Icsrc -Icsrc/include
 *         tests/fuzz/fuzz_expand.c csrc/sgmv.c csrc/planner.c csrc/driver.c tests/fuzz/fake_variants.c tests/fuzz/no_driver.c
 *         -Wl,--wrap=dlopen -pthread -ldl -o fuzz_expand
 *
 * No driver can load (no_driver.c), so every call either fails validation or stops at
 * SGMV_ERROR_NO_DRIVER. The device pointers are fake: they point into a PROT_NONE reservation,
 * so any access through them faults and libFuzzer reports it. Invariants that fail trap.
 *
 * Input (bytes past the end read as 0; tests/fuzz/make_corpus.py writes seeds in this format):
 *   a flags byte: bit 0 passes args = NULL, bit 1 also calls sgmv_device_count, bit 2 sgmv_device_arch;
 *   struct_size as sizeof(sgmv_expand_args_t) + a value;
 *   every other field in declaration order: a pointer is one byte (0: NULL, else a fake address),
 *   anything else a value (dtypes and add_inputs keep its low 32 bits);
 *   a value for sgmv_status_string (and the device of sgmv_device_arch).
 * A value is a tag byte, then by tag % 4: 0: int16; 1: special[byte] + int8; 2, 3: int64 (little endian).
 */
#define _DEFAULT_SOURCE /* pthread barriers, MAP_ANONYMOUS under -std=c11 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "sgmv.h"

#define CHECK(cond)                                                                                     \
  do {                                                                                                  \
    if (!(cond)) {                                                                                      \
      fprintf(stderr, "fuzz_expand: invariant failed, line %d: %s (last error \"%s\")\n", __LINE__, #cond, \
              sgmv_last_error());                                                                       \
      __builtin_trap();                                                                                 \
    }                                                                                                   \
  } while (0)

typedef struct {
  const uint8_t *p;
  size_t n;
} reader_t;

static uint64_t take_bytes(reader_t *r, int count) { /* little endian */
  uint64_t v = 0;
  for (int i = 0; i < count; i++) {
    uint64_t b = r->n ? (r->n--, *r->p++) : 0;
    v |= b << (8 * i);
  }
  return v;
}

/* Boundaries of the checks, so that the fuzzer reaches them without guessing 8 bytes. */
static const int64_t special[] = {0,           1,           -1,           16,          64,
                                  256,         1024,        4096,         INT32_MAX,   (int64_t)INT32_MAX + 1,
                                  INT64_MAX,   INT64_MIN,   (int64_t)1 << 31, (int64_t)1 << 32, (int64_t)1 << 62,
                                  INT64_MAX / 2, INT64_MAX / 3, INT64_MAX / 255};

static int64_t take_value(reader_t *r) {
  switch (take_bytes(r, 1) % 4) {
    case 0:
      return (int16_t)take_bytes(r, 2);
    case 1: { /* unsigned sum: wraps instead of overflowing */
      uint64_t base = (uint64_t)special[take_bytes(r, 1) % (sizeof special / sizeof special[0])];
      return (int64_t)(base + (uint64_t)(int64_t)(int8_t)take_bytes(r, 1));
    }
    default:
      return (int64_t)take_bytes(r, 8);
  }
}

#define RESERVED_SIZE (1 << 20)
static unsigned char *reserved; /* PROT_NONE: nothing may read or write it */

static void *take_ptr(reader_t *r) {
  unsigned b = (unsigned)take_bytes(r, 1);
  return b ? reserved + b * 4096 + (b & 15) : NULL; /* odd b: a misaligned address */
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc, (void)argv;
  reserved = mmap(NULL, RESERVED_SIZE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (reserved == MAP_FAILED) abort();
  return 0;
}

static int starts_with(const char *s, const char *prefix) { return strncmp(s, prefix, strlen(prefix)) == 0; }

/* (rows - 1) * stride + cols, the extent of a (rows, cols) view, fits in int64. */
static int extent(int64_t rows, int64_t stride, int64_t cols, int64_t *last) {
  return !__builtin_mul_overflow(rows - 1, stride, last) && !__builtin_add_overflow(*last, cols, last);
}

/* What accepted arguments must satisfy (sgmv.h), written independently of csrc/sgmv.c: sizes in
 * range, rows that do not overlap, and every element offset of every tensor within int64. */
static int well_formed(const sgmv_expand_args_t *a) {
  int64_t one_lora, last;
  if (a->total_tokens < 0 || a->total_tokens >= (int64_t)1 << 30 || a->hidden < 1 || a->hidden > 65535 * 64 ||
      a->rank < 1 || a->rank > 256 || a->num_loras < 1 || a->num_loras > INT32_MAX || a->batches < 0 ||
      a->batches >= (int64_t)1 << 30 ||
      a->max_seq_length < 0)
    return 0;
  if (a->inputs_row_stride < 0 || a->weights_lora_stride < 0 || a->weights_row_stride < 0 || a->output_row_stride < 0)
    return 0;
  if (a->total_tokens > 1 && (a->inputs_row_stride < a->rank || a->output_row_stride < a->hidden)) return 0;
  if (a->hidden > 1 && a->weights_row_stride < a->rank) return 0;
  if (!extent(a->hidden, a->weights_row_stride, a->rank, &one_lora)) return 0;
  if (a->num_loras > 1 && a->weights_lora_stride < one_lora) return 0;
  if (!extent(a->num_loras, a->weights_lora_stride, one_lora, &last)) return 0;
  if (a->total_tokens > 0 && (!extent(a->total_tokens, a->inputs_row_stride, a->rank, &last) ||
                              !extent(a->total_tokens, a->output_row_stride, a->hidden, &last)))
    return 0;
  return 1;
}

/* fp8 weights: 16-bit inputs, output that dtype or fp32 (this harness never passes their scales). */
static int fp8_ok(const sgmv_expand_args_t *a) {
  int x = (int)a->inputs_dtype, o = (int)a->output_dtype, m = (int)a->metadata_dtype;
  return a->weights_dtype == SGMV_DTYPE_FLOAT8_E4M3FN && (x == SGMV_DTYPE_FLOAT16 || x == SGMV_DTYPE_BFLOAT16) &&
         (o == x || o == SGMV_DTYPE_FLOAT32) && (m == SGMV_DTYPE_INT32 || m == SGMV_DTYPE_INT64);
}

static int dtypes_ok(const sgmv_expand_args_t *a) {
  int w = (int)a->weights_dtype, x = (int)a->inputs_dtype, o = (int)a->output_dtype, m = (int)a->metadata_dtype;
  return ((w == SGMV_DTYPE_FLOAT16 || w == SGMV_DTYPE_BFLOAT16) && (x == w || x == SGMV_DTYPE_FLOAT32) &&
          (o == w || o == SGMV_DTYPE_FLOAT32) && (m == SGMV_DTYPE_INT32 || m == SGMV_DTYPE_INT64)) || fp8_ok(a);
}

/* Pointers first: the weights always, the other data and metadata where there are rows to compute. */
static int pointers_ok(const sgmv_expand_args_t *a) {
  int work = a->batches > 0 && a->total_tokens > 0;
  return a->weights && (!work || (a->inputs && a->output && a->seq_start && a->seq_len && a->lora_indices));
}

static int size_of(int t) {
  return t == SGMV_DTYPE_FLOAT32 || t == SGMV_DTYPE_INT32 ? 4 : t == SGMV_DTYPE_INT64 ? 8 : t == SGMV_DTYPE_FLOAT8_E4M3FN ? 1 : 2;
}

/* Every pointer at a multiple of its element size (dtypes_ok first). */
static int aligned(const sgmv_expand_args_t *a) {
  int m = size_of(a->metadata_dtype);
  return (uintptr_t)a->inputs % size_of(a->inputs_dtype) == 0 && (uintptr_t)a->weights % size_of(a->weights_dtype) == 0 &&
         (uintptr_t)a->output % size_of(a->output_dtype) == 0 && (uintptr_t)a->seq_start % m == 0 &&
         (uintptr_t)a->seq_len % m == 0 && (uintptr_t)a->lora_indices % m == 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  reader_t r = {data, size};
  unsigned flags = (unsigned)take_bytes(&r, 1);
  sgmv_expand_args_t a;
  memset(&a, 0, sizeof a);
  a.struct_size = sizeof a + (size_t)take_value(&r);
  a.inputs = take_ptr(&r);
  a.inputs_dtype = (sgmv_dtype_t)(int32_t)take_value(&r);
  a.inputs_row_stride = take_value(&r);
  a.weights = take_ptr(&r);
  a.weights_dtype = (sgmv_dtype_t)(int32_t)take_value(&r);
  a.weights_lora_stride = take_value(&r);
  a.weights_row_stride = take_value(&r);
  a.output = take_ptr(&r);
  a.output_dtype = (sgmv_dtype_t)(int32_t)take_value(&r);
  a.output_row_stride = take_value(&r);
  a.total_tokens = take_value(&r);
  a.hidden = take_value(&r);
  a.rank = take_value(&r);
  a.num_loras = take_value(&r);
  a.seq_start = take_ptr(&r);
  a.seq_len = take_ptr(&r);
  a.lora_indices = take_ptr(&r);
  a.metadata_dtype = (sgmv_dtype_t)(int32_t)take_value(&r);
  a.batches = take_value(&r);
  a.max_seq_length = take_value(&r);
  a.add_inputs = (int32_t)take_value(&r);
  a.stream = (sgmv_stream_t)take_ptr(&r);
  int32_t probe = (int32_t)take_value(&r);

  /* A heap block only as long as struct_size says, when that is less than the struct (but holding
   * struct_size itself): ASan reports any read of a field the caller did not pass. */
  size_t n = a.struct_size >= sizeof a ? sizeof a : a.struct_size > sizeof(size_t) ? a.struct_size : sizeof(size_t);
  sgmv_expand_args_t *p = NULL;
  if (!(flags & 1)) {
    p = malloc(n);
    memcpy(p, &a, n);
  }

  char before[512];
  snprintf(before, sizeof before, "%s", sgmv_last_error());
  sgmv_status_t st = sgmv_expand(p);
  const char *msg = sgmv_last_error();
  free(p);

  CHECK(msg && strlen(msg) < 512);
  CHECK(st == SGMV_SUCCESS || st == SGMV_ERROR_INVALID_ARGUMENT || st == SGMV_ERROR_UNSUPPORTED_DTYPE ||
        st == SGMV_ERROR_NO_DRIVER); /* the only statuses reachable without a driver */
  if (st == SGMV_SUCCESS) CHECK(strcmp(msg, before) == 0); /* success keeps the last failure's message */
  if (st == SGMV_ERROR_INVALID_ARGUMENT || st == SGMV_ERROR_UNSUPPORTED_DTYPE) CHECK(starts_with(msg, "sgmv_expand: "));
  if (st == SGMV_ERROR_NO_DRIVER) CHECK(starts_with(msg, "no CUDA driver: cannot load libcuda.so.1 ("));

  if (flags & 1) {
    CHECK(st == SGMV_ERROR_INVALID_ARGUMENT && strcmp(msg, "sgmv_expand: args is NULL") == 0);
  } else if (a.struct_size < offsetof(sgmv_expand_args_t, stream) + sizeof a.stream || a.struct_size > sizeof a) {
    /* smaller than version 0.1's struct, or from a newer header */
    CHECK(st == SGMV_ERROR_INVALID_ARGUMENT && strstr(msg, "struct_size"));
  } else if (!pointers_ok(&a)) {
    CHECK(st == SGMV_ERROR_INVALID_ARGUMENT && strstr(msg, " NULL"));
  } else if (!dtypes_ok(&a)) {
    CHECK(st == SGMV_ERROR_UNSUPPORTED_DTYPE);
  } else if (fp8_ok(&a)) {
    CHECK(st == SGMV_ERROR_INVALID_ARGUMENT); /* at the latest: no scales */
  } else {
    CHECK(st != SGMV_ERROR_UNSUPPORTED_DTYPE);
    if (st == SGMV_SUCCESS || st == SGMV_ERROR_NO_DRIVER) CHECK(well_formed(&a) && aligned(&a));
    if (st == SGMV_SUCCESS) CHECK(a.batches == 0 || a.total_tokens == 0); /* nothing to do: no driver needed */
    if (st == SGMV_ERROR_NO_DRIVER)
      CHECK(a.batches > 0 && a.total_tokens > 0 && a.inputs && a.weights && a.output && a.seq_start && a.seq_len &&
            a.lora_indices);
  }

  const char *s = sgmv_status_string((sgmv_status_t)probe);
  CHECK(s && s[0]);
  CHECK((strcmp(s, "unknown status") == 0) == (probe < SGMV_SUCCESS || probe > SGMV_ERROR_INTERNAL));

  if (flags & 2) {
    int count = -1;
    CHECK(sgmv_device_count(&count) == SGMV_ERROR_NO_DRIVER && count == 0);
    CHECK(sgmv_device_count(NULL) == SGMV_ERROR_INVALID_ARGUMENT);
  }
  if (flags & 4) {
    int cc = -1, arch = -1;
    CHECK(sgmv_device_arch(probe, &cc, &arch) == SGMV_ERROR_NO_DRIVER && starts_with(sgmv_last_error(), "no CUDA driver"));
    CHECK(sgmv_device_arch(probe, NULL, &arch) == SGMV_ERROR_INVALID_ARGUMENT);
    CHECK(sgmv_device_arch(probe, &cc, NULL) == SGMV_ERROR_INVALID_ARGUMENT);
  }
  return 0;
}
