/* Loading libcuda.so.1. */
#include "driver.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>

#include "errors.h"
#include "sgmv.h"

static sgmv_driver_t driver;
static int driver_status = SGMV_ERROR_INTERNAL;
static char driver_message[512];
static pthread_once_t driver_once = PTHREAD_ONCE_INIT;

static void load_driver(void) {
  /* The handle is kept for the life of the process: libcuda must not be unloaded under us. */
  void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    const char *why = dlerror();
    driver_status = SGMV_ERROR_NO_DRIVER;
    snprintf(driver_message, sizeof driver_message, "no CUDA driver: cannot load libcuda.so.1 (%s)",
             why ? why : "unknown reason");
    return;
  }
#define LOAD(name)                                                                                   \
  do {                                                                                               \
    *(void **)&driver.name = dlsym(lib, #name);                                                      \
    if (!driver.name) {                                                                              \
      driver_status = SGMV_ERROR_NO_DRIVER;                                                          \
      snprintf(driver_message, sizeof driver_message,                                                \
               "CUDA driver too old: libcuda.so.1 lacks %s (CUDA 12.0 or newer is needed)", #name); \
      return;                                                                                        \
    }                                                                                                \
  } while (0)
  LOAD(cuInit);
  LOAD(cuDriverGetVersion);
  LOAD(cuGetErrorName);
  LOAD(cuDeviceGetCount);
  LOAD(cuDeviceGet);
  LOAD(cuDeviceGetAttribute);
  LOAD(cuCtxGetCurrent);
  LOAD(cuCtxPushCurrent);
  LOAD(cuCtxPopCurrent);
  LOAD(cuCtxGetDevice);
  LOAD(cuCtxGetId);
  LOAD(cuStreamGetCtx);
  LOAD(cuLibraryLoadData);
  LOAD(cuLibraryGetKernel);
  LOAD(cuLibraryUnload);
  LOAD(cuKernelSetAttribute);
  LOAD(cuKernelGetFunction);
  LOAD(cuLaunchKernel);
#undef LOAD
  int version = 0;
  driver.cuDriverGetVersion(&version);
  if (version < 12000) {
    driver_status = SGMV_ERROR_NO_DRIVER;
    snprintf(driver_message, sizeof driver_message,
             "CUDA driver too old: it supports CUDA %d.%d, libsgmv needs 12.0 or newer", version / 1000,
             version % 1000 / 10);
    return;
  }
  CUresult res = driver.cuInit(0);
  if (res != 0) {
    const char *name = "unknown";
    driver.cuGetErrorName(res, &name);
    driver_status = res == CUDA_ERROR_NO_DEVICE_ ? SGMV_ERROR_NO_DEVICE : SGMV_ERROR_CUDA;
    snprintf(driver_message, sizeof driver_message, "cuInit failed: %s (%d)%s", name ? name : "unknown", res,
             res == CUDA_ERROR_NO_DEVICE_ ? ": no CUDA device" : "");
    return;
  }
  driver_status = SGMV_SUCCESS;
}

const sgmv_driver_t *sgmv_driver(int *status) {
  pthread_once(&driver_once, load_driver);
  *status = driver_status;
  if (driver_status != SGMV_SUCCESS) {
    sgmv_set_error(driver_status, "%s", driver_message);
    return NULL;
  }
  return &driver;
}

int sgmv_cuda_error(const sgmv_driver_t *cu, CUresult res, const char *what) {
  const char *name = NULL;
  if (cu->cuGetErrorName(res, &name) != 0 || !name) name = "unknown CUDA error";
  return sgmv_set_error(SGMV_ERROR_CUDA, "%s failed: %s (%d)", what, name, res);
}
