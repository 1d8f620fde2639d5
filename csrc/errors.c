/* Statuses and the per-thread last-error message. */
#include "errors.h"

#include <stdarg.h>
#include <stdio.h>

#include "sgmv.h"

static _Thread_local char last_error[512];

int sgmv_set_error(int status, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(last_error, sizeof last_error, fmt, ap);
  va_end(ap);
  return status;
}

SGMV_API const char *sgmv_last_error(void) { return last_error; }

SGMV_API const char *sgmv_status_string(sgmv_status_t status) {
  switch (status) {
    case SGMV_SUCCESS: return "success";
    case SGMV_ERROR_INVALID_ARGUMENT: return "invalid argument";
    case SGMV_ERROR_UNSUPPORTED_DTYPE: return "unsupported dtype";
    case SGMV_ERROR_NO_DRIVER: return "no CUDA driver";
    case SGMV_ERROR_NO_DEVICE: return "no CUDA device";
    case SGMV_ERROR_UNSUPPORTED_ARCH: return "unsupported GPU architecture";
    case SGMV_ERROR_CUDA: return "CUDA driver error";
    case SGMV_ERROR_INTERNAL: return "internal error";
  }
  return "unknown status";
}
