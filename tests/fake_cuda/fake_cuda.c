/* A fake libcuda.so.1 for fault-injection tests (tests/test_faults.py): every driver function
 * libsgmv dlsym()s, over one fake device (compute capability 9.0 unless FAKE_CUDA_CC says otherwise)
 * and one fake context. It never dereferences a device pointer; it does check what it can (handles
 * it issued, a cubin's ELF header, context push/pop balance) and counts every call.
 *
 * Built by the test: gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o DIR/libcuda.so.1 fake_cuda.c -pthread
 * and found by dlopen("libcuda.so.1") through LD_LIBRARY_PATH=DIR.
 *
 * Environment:
 *   FAKE_CUDA_FAIL=name[:count[:code]][,name...]  name returns code (default: the function's usual
 *                                                 error, below) for its first count calls (default 1)
 *   FAKE_CUDA_CC=75                               the device's compute capability
 *   FAKE_CUDA_VERSION=11080                       what cuDriverGetVersion reports (default 12080)
 *   FAKE_CUDA_NO_CONTEXT=1                        no context is current at first
 *   FAKE_CUDA_ANY_IMAGE=1                         load any image, not only CUDA ELF files (for the
 *                                                 dummy cubins of tests/fuzz/fake_variants.c)
 * Compiled with -DFAKE_CUDA_11 it lacks the cuLibrary* functions, as drivers before CUDA 12.0 do.
 * The fake_cuda_* functions at the end let a test inject faults at run time and read the counters. */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define API __attribute__((visibility("default")))
#ifdef FAKE_CUDA_11 /* a driver older than CUDA 12.0: no cuLibrary* functions exported */
#define LIBRARY_API __attribute__((unused)) static
#else
#define LIBRARY_API API
#endif

typedef int CUresult;
typedef int CUdevice;

enum {
  OK = 0,
  INVALID_VALUE = 1,
  NOT_INITIALIZED = 3,
  INVALID_DEVICE = 101,
  INVALID_IMAGE = 200,
  INVALID_CONTEXT = 201,
  INVALID_HANDLE = 400,
  NOT_FOUND = 500,
  LAUNCH_FAILED = 719,
  UNKNOWN = 999
};

static const struct {
  int code;
  const char *name;
} error_names[] = {
    {OK, "CUDA_SUCCESS"},
    {INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE"},
    {2, "CUDA_ERROR_OUT_OF_MEMORY"},
    {NOT_INITIALIZED, "CUDA_ERROR_NOT_INITIALIZED"},
    {100, "CUDA_ERROR_NO_DEVICE"},
    {INVALID_DEVICE, "CUDA_ERROR_INVALID_DEVICE"},
    {INVALID_IMAGE, "CUDA_ERROR_INVALID_IMAGE"},
    {INVALID_CONTEXT, "CUDA_ERROR_INVALID_CONTEXT"},
    {209, "CUDA_ERROR_NO_BINARY_FOR_GPU"},
    {INVALID_HANDLE, "CUDA_ERROR_INVALID_HANDLE"},
    {NOT_FOUND, "CUDA_ERROR_NOT_FOUND"},
    {701, "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES"},
    {LAUNCH_FAILED, "CUDA_ERROR_LAUNCH_FAILED"},
    {UNKNOWN, "CUDA_ERROR_UNKNOWN"},
};

/* ---- the counters and injected faults, by function name ---------------------------------- */

#define MAX_FUNCS 32
static struct {
  const char *name;
  int calls, failures;  /* failures: injected ones, among calls */
  int fail_left, fail_code;
} funcs[MAX_FUNCS];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t env_once = PTHREAD_ONCE_INIT;

static int default_error(const char *name) {
  if (!strcmp(name, "cuLibraryLoadData")) return INVALID_IMAGE;
  if (!strncmp(name, "cuLaunchKernel", 14)) return LAUNCH_FAILED;
  if (!strncmp(name, "cuCtx", 5) || !strcmp(name, "cuStreamGetCtx")) return INVALID_CONTEXT;
  if (!strcmp(name, "cuLibraryGetKernel")) return NOT_FOUND;
  if (!strncmp(name, "cuKernel", 8) || !strcmp(name, "cuLibraryUnload")) return INVALID_HANDLE;
  return UNKNOWN;
}

static int slot(const char *name) { /* under lock */
  int i;
  for (i = 0; i < MAX_FUNCS && funcs[i].name; i++)
    if (!strcmp(funcs[i].name, name)) return i;
  if (i == MAX_FUNCS) abort(); /* a test fake: more names than slots is a bug in it */
  funcs[i].name = strdup(name);
  return i;
}

static void inject(const char *name, int count, int code) {
  pthread_mutex_lock(&lock);
  int i = slot(name);
  funcs[i].fail_left = count;
  funcs[i].fail_code = code ? code : default_error(name);
  pthread_mutex_unlock(&lock);
}

static void read_env(void) {
  const char *spec = getenv("FAKE_CUDA_FAIL");
  if (!spec || !*spec) return;
  char *copy = strdup(spec), *save = NULL;
  for (char *item = strtok_r(copy, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
    char *count = strchr(item, ':'), *code = NULL;
    if (count) {
      *count++ = 0;
      code = strchr(count, ':');
      if (code) *code++ = 0;
    }
    inject(item, count ? atoi(count) : 1, code ? atoi(code) : 0);
  }
  free(copy);
}

/* Counts a call to `name`; returns the error to inject, or 0. */
static CUresult enter(const char *name) {
  pthread_once(&env_once, read_env);
  pthread_mutex_lock(&lock);
  int i = slot(name);
  funcs[i].calls++;
  CUresult res = 0;
  if (funcs[i].fail_left > 0) {
    funcs[i].fail_left--;
    funcs[i].failures++;
    res = funcs[i].fail_code;
  }
  pthread_mutex_unlock(&lock);
  return res;
}

#define ENTER()                              \
  do {                                       \
    CUresult injected_ = enter(__func__);    \
    if (injected_) return injected_;         \
  } while (0)

/* ---- the fake device, context and handles ------------------------------------------------- */

static int env_int(const char *name, int fallback) {
  const char *v = getenv(name);
  return v && *v ? atoi(v) : fallback;
}

struct CUctx_st { int magic; };
static struct CUctx_st the_context = {0x0c7c7c7c};
static _Thread_local struct CUctx_st *ctx_stack[16];
static _Thread_local int ctx_depth = -1; /* -1: not set up yet on this thread */
static _Thread_local int pushes, pops;
static int initialized;

static struct CUctx_st **current(void) {
  if (ctx_depth < 0) {
    ctx_depth = 0;
    ctx_stack[0] = env_int("FAKE_CUDA_NO_CONTEXT", 0) ? NULL : &the_context;
  }
  return &ctx_stack[ctx_depth];
}

/* Handles live in static tables, never on the heap: an unloaded library stays readable (its magic
 * cleared), so a stale handle is reported as CUDA_ERROR_INVALID_HANDLE, not read after free. */
#define LIB_MAGIC 0x11b
#define KERNEL_MAGIC 0x4e1
#define FUNC_MAGIC 0xf00
#define MAX_HANDLES 4096
typedef struct CUlib_st { int magic; } fake_library;
typedef struct CUfunc_st { int magic; struct CUkern_st *kernel; } fake_function;
typedef struct CUkern_st {
  int magic;
  fake_library *lib;
  char name[128];
  fake_function func;
  int max_dynamic_shared; /* raised by cuKernelSetAttribute */
} fake_kernel;
static fake_library libraries[MAX_HANDLES];
static fake_kernel kernels[MAX_HANDLES];
static int num_libraries, num_kernels, live_libraries;

static struct {
  unsigned grid[3], block[3], shared;
  void *stream;
  int has_params, has_extra, programmatic;
} last_launch;

/* ---- the driver API ------------------------------------------------------------------------ */

API CUresult cuInit(unsigned flags) {
  ENTER();
  if (flags) return INVALID_VALUE;
  __atomic_store_n(&initialized, 1, __ATOMIC_RELEASE);
  return OK;
}

#define NEED_INIT() \
  if (!__atomic_load_n(&initialized, __ATOMIC_ACQUIRE)) return NOT_INITIALIZED

API CUresult cuDriverGetVersion(int *version) {
  ENTER();
  if (!version) return INVALID_VALUE;
  *version = env_int("FAKE_CUDA_VERSION", 12080);
  return OK;
}

API CUresult cuGetErrorName(CUresult error, const char **name) {
  /* Not ENTER(): libsgmv calls it to report the faults injected elsewhere. */
  pthread_mutex_lock(&lock);
  funcs[slot(__func__)].calls++;
  pthread_mutex_unlock(&lock);
  if (!name) return INVALID_VALUE;
  for (size_t i = 0; i < sizeof error_names / sizeof error_names[0]; i++)
    if (error_names[i].code == error) {
      *name = error_names[i].name;
      return OK;
    }
  *name = NULL;
  return INVALID_VALUE;
}

API CUresult cuDeviceGetCount(int *count) {
  ENTER();
  NEED_INIT();
  if (!count) return INVALID_VALUE;
  *count = 1;
  return OK;
}

API CUresult cuDeviceGet(CUdevice *dev, int ordinal) {
  ENTER();
  NEED_INIT();
  if (!dev) return INVALID_VALUE;
  if (ordinal != 0) return INVALID_DEVICE;
  *dev = 0;
  return OK;
}

API CUresult cuDeviceGetAttribute(int *value, int attrib, CUdevice dev) {
  ENTER();
  NEED_INIT();
  if (!value) return INVALID_VALUE;
  if (dev != 0) return INVALID_DEVICE;
  int cc = env_int("FAKE_CUDA_CC", 90);
  switch (attrib) { /* an H100's values */
    case 1: *value = 1024; return OK;                 /* MAX_THREADS_PER_BLOCK */
    case 2: case 3: *value = 1024; return OK;         /* MAX_BLOCK_DIM_X, _Y */
    case 4: *value = 64; return OK;                   /* MAX_BLOCK_DIM_Z */
    case 5: *value = 2147483647; return OK;           /* MAX_GRID_DIM_X */
    case 6: case 7: *value = 65535; return OK;        /* MAX_GRID_DIM_Y, _Z */
    case 8: *value = 49152; return OK;                /* MAX_SHARED_MEMORY_PER_BLOCK */
    case 10: *value = 32; return OK;                  /* WARP_SIZE */
    case 16: *value = 132; return OK;                 /* MULTIPROCESSOR_COUNT */
    case 39: *value = 2048; return OK;                /* MAX_THREADS_PER_MULTIPROCESSOR */
    case 75: *value = cc / 10; return OK;             /* COMPUTE_CAPABILITY_MAJOR */
    case 76: *value = cc % 10; return OK;             /* COMPUTE_CAPABILITY_MINOR */
    case 81: *value = 233472; return OK;             /* MAX_SHARED_MEMORY_PER_MULTIPROCESSOR */
    case 97: *value = 232448; return OK;             /* MAX_SHARED_MEMORY_PER_BLOCK_OPTIN */
  }
  return INVALID_VALUE;
}

API CUresult cuCtxGetCurrent(struct CUctx_st **ctx) {
  ENTER();
  if (!ctx) return INVALID_VALUE;
  *ctx = *current();
  return OK;
}

API CUresult cuCtxPushCurrent(struct CUctx_st *ctx) {
  ENTER();
  current();
  if (ctx != &the_context) return INVALID_CONTEXT;
  if (ctx_depth + 1 >= (int)(sizeof ctx_stack / sizeof ctx_stack[0])) return UNKNOWN;
  ctx_stack[++ctx_depth] = ctx;
  pushes++;
  return OK;
}

API CUresult cuCtxPopCurrent(struct CUctx_st **ctx) {
  ENTER();
  current();
  if (ctx_depth == 0) return INVALID_CONTEXT; /* popping what was never pushed */
  if (ctx) *ctx = ctx_stack[ctx_depth];
  ctx_depth--;
  pops++;
  return OK;
}

API CUresult cuCtxGetDevice(CUdevice *dev) {
  ENTER();
  if (!dev) return INVALID_VALUE;
  if (!*current()) return INVALID_CONTEXT;
  *dev = 0;
  return OK;
}

API CUresult cuCtxGetId(struct CUctx_st *ctx, unsigned long long *id) {
  ENTER();
  if (!id) return INVALID_VALUE;
  if (!ctx) ctx = *current();
  if (ctx != &the_context) return INVALID_CONTEXT;
  *id = 1;
  return OK;
}

API CUresult cuStreamGetCtx(void *stream, struct CUctx_st **ctx) {
  ENTER();
  if (!ctx) return INVALID_VALUE;
  if (stream) { /* a stream of the one context */
    *ctx = &the_context;
    return OK;
  }
  if (!*current()) return INVALID_CONTEXT; /* the legacy default stream needs a current context */
  *ctx = *current();
  return OK;
}

LIBRARY_API CUresult cuLibraryLoadData(fake_library **lib, const void *code, void *jit_options, void **jit_values,
                               unsigned num_jit, void *lib_options, void **lib_values, unsigned num_lib) {
  ENTER();
  NEED_INIT();
  (void)jit_options, (void)jit_values, (void)num_jit, (void)lib_options, (void)lib_values, (void)num_lib;
  if (!lib || !code) return INVALID_VALUE;
  /* A cubin is a CUDA ELF: 64-bit, little endian, e_machine 190 (EM_CUDA). The image is host memory. */
  const unsigned char *e = code;
  if (!env_int("FAKE_CUDA_ANY_IMAGE", 0) && (memcmp(e, "\x7f" "ELF\x02\x01", 6) != 0 || (e[0x12] | e[0x13] << 8) != 190))
    return INVALID_IMAGE;
  pthread_mutex_lock(&lock);
  CUresult res = 2; /* CUDA_ERROR_OUT_OF_MEMORY */
  if (num_libraries < MAX_HANDLES) {
    *lib = &libraries[num_libraries++];
    (*lib)->magic = LIB_MAGIC;
    live_libraries++;
    res = OK;
  }
  pthread_mutex_unlock(&lock);
  return res;
}

LIBRARY_API CUresult cuLibraryUnload(fake_library *lib) {
  ENTER();
  pthread_mutex_lock(&lock);
  CUresult res = INVALID_HANDLE;
  if (lib && lib->magic == LIB_MAGIC) {
    lib->magic = 0;
    live_libraries--;
    res = OK;
  }
  pthread_mutex_unlock(&lock);
  return res;
}

LIBRARY_API CUresult cuLibraryGetKernel(fake_kernel **kernel, fake_library *lib, const char *name) {
  ENTER();
  if (!kernel || !name) return INVALID_VALUE;
  if (!lib || lib->magic != LIB_MAGIC) return INVALID_HANDLE;
  if (!*name || strlen(name) >= sizeof kernels[0].name) return NOT_FOUND;
  pthread_mutex_lock(&lock);
  CUresult res = 2;
  if (num_kernels < MAX_HANDLES) {
    fake_kernel *k = &kernels[num_kernels++];
    k->magic = KERNEL_MAGIC;
    k->lib = lib;
    strcpy(k->name, name);
    k->func.magic = FUNC_MAGIC;
    k->func.kernel = k;
    k->max_dynamic_shared = 49152;
    *kernel = k;
    res = OK;
  }
  pthread_mutex_unlock(&lock);
  return res;
}

static int valid_kernel(const fake_kernel *k) { return k && k->magic == KERNEL_MAGIC && k->lib->magic == LIB_MAGIC; }

API CUresult cuKernelSetAttribute(int attrib, int value, fake_kernel *kernel, CUdevice dev) {
  ENTER();
  if (!valid_kernel(kernel)) return INVALID_HANDLE;
  if (dev != 0) return INVALID_DEVICE;
  if (attrib == 8) { /* MAX_DYNAMIC_SHARED_SIZE_BYTES */
    if (value < 0 || value > 232448) return INVALID_VALUE;
    kernel->max_dynamic_shared = value;
  }
  return OK;
}

API CUresult cuKernelGetFunction(fake_function **func, fake_kernel *kernel) {
  ENTER();
  if (!func) return INVALID_VALUE;
  if (!valid_kernel(kernel)) return INVALID_HANDLE;
  if (!*current()) return INVALID_CONTEXT;
  *func = &kernel->func;
  return OK;
}

static CUresult launch(fake_function *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                       unsigned shared, void *stream, void **params, void **extra, int programmatic) {
  if (!f || f->magic != FUNC_MAGIC || !valid_kernel(f->kernel)) return INVALID_HANDLE;
  if (!*current()) return INVALID_CONTEXT;
  if (!gx || !gy || !gz || gy > 65535 || gz > 65535 || !bx || !by || !bz || bx * by * bz > 1024 ||
      shared > 232448)
    return INVALID_VALUE;
  /* Over the default 48 KB only after the kernel's limit was raised, as on a real device. */
  if (shared > 49152 && (int)shared > f->kernel->max_dynamic_shared) return INVALID_VALUE;
  pthread_mutex_lock(&lock);
  last_launch.grid[0] = gx, last_launch.grid[1] = gy, last_launch.grid[2] = gz;
  last_launch.block[0] = bx, last_launch.block[1] = by, last_launch.block[2] = bz;
  last_launch.shared = shared;
  last_launch.stream = stream;
  last_launch.has_params = params != NULL;
  last_launch.has_extra = extra != NULL;
  last_launch.programmatic = programmatic;
  pthread_mutex_unlock(&lock);
  return OK;
}

API CUresult cuLaunchKernel(fake_function *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                            unsigned bz, unsigned shared, void *stream, void **params, void **extra) {
  ENTER();
  return launch(f, gx, gy, gz, bx, by, bz, shared, stream, params, extra, 0);
}

/* cuda.h's CUlaunchConfig and CUlaunchAttribute; attribute 6: programmatic stream serialization,
 * which only sm_90 and newer accept. */
typedef struct {
  int id;
  char pad[4];
  union {
    char bytes[64];
    int value;
  } value;
} fake_launch_attribute;
typedef struct {
  unsigned gx, gy, gz, bx, by, bz, shared;
  void *stream;
  fake_launch_attribute *attrs;
  unsigned num_attrs;
} fake_launch_config;

API CUresult cuLaunchKernelEx(const fake_launch_config *c, fake_function *f, void **params, void **extra) {
  ENTER();
  if (!c || (c->num_attrs && !c->attrs)) return INVALID_VALUE;
  int programmatic = 0;
  for (unsigned i = 0; i < c->num_attrs; i++) {
    if (c->attrs[i].id != 6) return INVALID_VALUE;
    programmatic = c->attrs[i].value.value != 0;
  }
  if (programmatic && env_int("FAKE_CUDA_CC", 90) < 90) return INVALID_VALUE;
  return launch(f, c->gx, c->gy, c->gz, c->bx, c->by, c->bz, c->shared, c->stream, params, extra, programmatic);
}

API CUresult cuMemsetD32Async(uint64_t ptr, unsigned value, size_t n, void *stream) {
  ENTER();
  (void)value, (void)stream;
  if (!ptr && n) return INVALID_VALUE;
  return OK;
}

/* ---- for the tests -------------------------------------------------------------------------- */

/* Calls of `name` so far (injected failures included), and how many of them were injected failures. */
API int fake_cuda_calls(const char *name) {
  pthread_mutex_lock(&lock);
  int n = funcs[slot(name)].calls;
  pthread_mutex_unlock(&lock);
  return n;
}

API int fake_cuda_failures(const char *name) {
  pthread_mutex_lock(&lock);
  int n = funcs[slot(name)].failures;
  pthread_mutex_unlock(&lock);
  return n;
}

/* From now on, `name` fails its next `count` calls with `code` (0: its usual error). */
API void fake_cuda_fail(const char *name, int count, int code) {
  pthread_once(&env_once, read_env);
  inject(name, count, code);
}

/* Libraries loaded and not unloaded. */
API int fake_cuda_live_libraries(void) {
  pthread_mutex_lock(&lock);
  int n = live_libraries;
  pthread_mutex_unlock(&lock);
  return n;
}

/* This thread's context stack: pushes, pops, and depth above the starting context. */
API void fake_cuda_context_stack(int out[3]) {
  current();
  out[0] = pushes, out[1] = pops, out[2] = ctx_depth;
}

/* The last launch: grid x, y, z, block x, y, z, shared bytes, params given, extra given,
 * programmatic stream serialization; its stream. */
API void *fake_cuda_last_launch(unsigned out[10]) {
  pthread_mutex_lock(&lock);
  memcpy(out, last_launch.grid, sizeof last_launch.grid);
  memcpy(out + 3, last_launch.block, sizeof last_launch.block);
  out[6] = last_launch.shared;
  out[7] = (unsigned)last_launch.has_params;
  out[8] = (unsigned)last_launch.has_extra;
  out[9] = (unsigned)last_launch.programmatic;
  void *stream = last_launch.stream;
  pthread_mutex_unlock(&lock);
  return stream;
}
