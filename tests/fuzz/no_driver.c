/* Linked with -Wl,--wrap=dlopen into the sanitizer and fuzz builds: csrc/driver.c's
 * dlopen("libcuda.so.1") is sent to a path that cannot exist, so every call that passes
 * validation stops at SGMV_ERROR_NO_DRIVER, even on a machine with a GPU. The fake device
 * pointers these tests pass must never reach a real driver. */
#include <string.h>

void *__real_dlopen(const char *file, int flags);

void *__wrap_dlopen(const char *file, int flags) {
  if (file && strcmp(file, "libcuda.so.1") == 0) file = "/nonexistent-sgmv-test/libcuda.so.1";
  return __real_dlopen(file, flags);
}
