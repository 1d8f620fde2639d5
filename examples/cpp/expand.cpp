// libsgmv from C++17 with the CUDA runtime API: one sgmv_expand call on its own stream, checked
// element by element against a host reference in double precision. Errors become exceptions;
// device memory and the stream are released by RAII.
//
// Build with CMake (see CMakeLists.txt here) or with pkg-config:
//   export PKG_CONFIG_PATH=$(sgmv --pkgconfig-dir)
//   g++ -std=c++17 expand.cpp $(pkg-config --cflags --libs sgmv) -I/usr/local/cuda/include -L/usr/local/cuda/lib64 -lcudart -o expand
// Exit status: 0 ok, 1 a CUDA or sgmv error or a wrong result.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "sgmv.h"

namespace {

void cuda_check(cudaError_t e, const char *what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string(what) + " failed: " + cudaGetErrorName(e) + " (" +
                             cudaGetErrorString(e) + ")");
}

void sgmv_check(sgmv_status_t st) {
  if (st != SGMV_SUCCESS)
    throw std::runtime_error(std::string("sgmv_expand failed: ") + sgmv_status_string(st) + ": " + sgmv_last_error());
}

// A device copy of a host vector, freed with its owner.
template <class T>
struct DeviceVector {
  void *ptr = nullptr;
  explicit DeviceVector(const std::vector<T> &host) {
    cuda_check(cudaMalloc(&ptr, host.size() * sizeof(T)), "cudaMalloc");
    cuda_check(cudaMemcpy(ptr, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy");
  }
  ~DeviceVector() { cudaFree(ptr); }
  DeviceVector(const DeviceVector &) = delete;
  DeviceVector &operator=(const DeviceVector &) = delete;
};

struct Stream {
  cudaStream_t s = nullptr;
  Stream() { cuda_check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate"); }
  ~Stream() { cudaStreamDestroy(s); }
  Stream(const Stream &) = delete;
  Stream &operator=(const Stream &) = delete;
};

// bf16 is the top half of an fp32; round to nearest even (the inputs here are finite).
uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fff + ((u >> 16) & 1);
  return uint16_t(u >> 16);
}
double from_bf16(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

constexpr int T = 64, R = 16, N = 512, L = 3;  // tokens, rank, hidden, adapters

int run() {
  // Segments: rows start..start+len-1 use adapter idx. One is empty, one is skipped (-1);
  // rows 62 and 63 belong to no segment. All of them must stay untouched.
  const std::vector<int32_t> start{0, 20, 20, 32, 50}, len{20, 0, 12, 18, 12}, idx{1, 0, -1, 2, 0};
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<uint16_t> x(T * R), w(L * N * R);
  std::vector<float> out0(T * N), out(T * N);
  for (auto &v : x) v = to_bf16(u(rng));
  for (auto &v : w) v = to_bf16(u(rng));
  for (auto &v : out0) v = u(rng);

  Stream stream;
  DeviceVector<uint16_t> dx(x), dw(w);
  DeviceVector<float> dout(out0);
  DeviceVector<int32_t> dstart(start), dlen(len), didx(idx);

  sgmv_expand_args_t a = SGMV_EXPAND_ARGS_INIT;  // fields added by later versions read as their defaults
  a.inputs = dx.ptr;
  a.inputs_dtype = SGMV_DTYPE_BFLOAT16;
  a.inputs_row_stride = R;
  a.weights = dw.ptr;
  a.weights_dtype = SGMV_DTYPE_BFLOAT16;
  a.weights_lora_stride = int64_t(N) * R;
  a.weights_row_stride = R;
  a.output = dout.ptr;
  a.output_dtype = SGMV_DTYPE_FLOAT32;
  a.output_row_stride = N;
  a.total_tokens = T;
  a.hidden = N;
  a.rank = R;
  a.num_loras = L;
  a.seq_start = dstart.ptr;
  a.seq_len = dlen.ptr;
  a.lora_indices = didx.ptr;
  a.metadata_dtype = SGMV_DTYPE_INT32;
  a.batches = int64_t(start.size());
  a.max_seq_length = 20;  // the longest segment; only sizes the launch grid
  a.add_inputs = 1;       // out += x @ W^T
  a.stream = stream.s;    // cudaStream_t and sgmv_stream_t are the same type
  sgmv_check(sgmv_expand(&a));
  cuda_check(cudaStreamSynchronize(stream.s), "cudaStreamSynchronize");  // the launch is asynchronous
  cuda_check(cudaMemcpy(out.data(), dout.ptr, out.size() * sizeof(float), cudaMemcpyDeviceToHost), "cudaMemcpy");

  // Reference in double. Each element's error is measured against the sum of the magnitudes
  // of its terms: fp32 accumulation keeps that ratio near 1e-7.
  std::vector<bool> written(T);
  double max_err = 0;
  for (size_t b = 0; b < start.size(); b++) {
    if (idx[b] < 0 || idx[b] >= L) continue;
    for (int m = start[b]; m < start[b] + len[b] && m < T; m++) {
      written[m] = true;
      for (int n = 0; n < N; n++) {
        double ref = out0[m * N + n], scale = std::fabs(ref);
        for (int k = 0; k < R; k++) {
          double p = from_bf16(x[m * R + k]) * from_bf16(w[(size_t(idx[b]) * N + n) * R + k]);
          ref += p;
          scale += std::fabs(p);
        }
        double err = std::fabs(out[m * N + n] - ref) / scale;
        if (!(err <= max_err)) max_err = err;  // also catches NaN
      }
    }
  }
  int untouched = 0;
  for (int m = 0; m < T; m++) {
    if (written[m]) continue;
    untouched++;
    if (std::memcmp(&out[m * N], &out0[m * N], N * sizeof(float)) != 0)
      throw std::runtime_error("row " + std::to_string(m) + " changed but no segment writes it");
  }
  std::printf("expand: max relative error %.3g; %d untouched rows unchanged\n", max_err, untouched);
  if (!(max_err <= 1e-5)) throw std::runtime_error("error above 1e-5");
  std::printf("expand: ok\n");
  return 0;
}

}  // namespace

int main() {
  try {
    return run();
  } catch (const std::exception &e) {
    std::fprintf(stderr, "expand: FAILED: %s\n", e.what());
    return 1;
  }
}
