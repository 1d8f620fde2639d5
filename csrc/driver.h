/* The CUDA driver API, loaded with dlopen on first use: libsgmv.so has no link-time dependency
 * on libcuda, so it loads on machines without a driver and says so with a status.
 * Only the few types and constants the dispatcher needs are declared here (values from cuda.h). */
#ifndef SGMV_DRIVER_H
#define SGMV_DRIVER_H

#include <stdint.h>

typedef int CUresult;
typedef int CUdevice;
typedef struct CUctx_st *CUcontext;
typedef struct CUstream_st *CUstream;
typedef struct CUlib_st *CUlibrary;
typedef struct CUkern_st *CUkernel;
typedef struct CUfunc_st *CUfunction;

enum {
  CUDA_SUCCESS_ = 0,
  CUDA_ERROR_NO_DEVICE_ = 100,
  CU_ATTR_CC_MAJOR = 75,            /* CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR */
  CU_ATTR_CC_MINOR = 76,            /* CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR */
  CU_ATTR_SMEM_OPTIN = 97,          /* CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN */
  CU_FUNC_ATTR_MAX_DYN_SMEM = 8     /* CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES */
};

typedef struct {
  CUresult (*cuInit)(unsigned int);
  CUresult (*cuDriverGetVersion)(int *);
  CUresult (*cuGetErrorName)(CUresult, const char **);
  CUresult (*cuDeviceGetCount)(int *);
  CUresult (*cuDeviceGet)(CUdevice *, int);
  CUresult (*cuDeviceGetAttribute)(int *, int, CUdevice);
  CUresult (*cuCtxGetCurrent)(CUcontext *);
  CUresult (*cuCtxPushCurrent)(CUcontext);
  CUresult (*cuCtxPopCurrent)(CUcontext *);
  CUresult (*cuCtxGetDevice)(CUdevice *);
  CUresult (*cuCtxGetId)(CUcontext, unsigned long long *);
  CUresult (*cuStreamGetCtx)(CUstream, CUcontext *);
  CUresult (*cuLibraryLoadData)(CUlibrary *, const void *, void *, void **, unsigned int, void *, void **,
                                unsigned int);
  CUresult (*cuLibraryGetKernel)(CUkernel *, CUlibrary, const char *);
  CUresult (*cuLibraryUnload)(CUlibrary);
  CUresult (*cuKernelSetAttribute)(int, int, CUkernel, CUdevice);
  CUresult (*cuKernelGetFunction)(CUfunction *, CUkernel);
  CUresult (*cuLaunchKernel)(CUfunction, unsigned int, unsigned int, unsigned int, unsigned int, unsigned int,
                             unsigned int, unsigned int, CUstream, void **, void **);
} sgmv_driver_t;

/* The loaded driver, or NULL with the status and message set (sgmv_set_error). Thread-safe. */
const sgmv_driver_t *sgmv_driver(int *status);

/* Records a failed driver call as SGMV_ERROR_CUDA with the driver's error name; returns it. */
int sgmv_cuda_error(const sgmv_driver_t *cu, CUresult res, const char *what);

#endif
