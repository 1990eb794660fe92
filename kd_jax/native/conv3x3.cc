// Direct 3×3 stride-1 convolutions for XLA:CPU, as XLA FFI handlers.
//
// XLA:CPU computes a convolution as Eigen's image-patch packing followed by
// a matrix multiply; with 8-64 output channels on a wide image the packing
// costs more than the multiply-adds. Here each output row is computed
// directly: a block of UR output pixels × CO channels stays in vector
// registers while the nine taps and the input channels are swept, the input
// value broadcast and multiplied with the kernel's row of output channels.
//
//   KdConv3x3Forward(xp, w) -> y       y[n,h,x,o] = Σ_{i,j,c} xp[n,h+i,x+j,c]·w[i,j,c,o]
//   KdConv3x3Kernel(xp, dy) -> dw      dw[i,j,c,o] = Σ_{n,h,x} xp[n,h+i,x+j,c]·dy[n,h,x,o]
//
// xp is the input padded by one on each side of height and width (NHWC),
// w the HWIO kernel, y and dy NHWC. The input gradient is the forward
// applied to the padded output gradient with the flipped, transposed
// kernel (done by the caller). Float32 throughout; work is shared over
// XLA's intra-op thread pool.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// (A vector_size attribute on an alias template is dropped by GCC, so the
// type lives in a class template.)
template <int VW>
struct VecType {
  typedef float type __attribute__((vector_size(VW * 4)));
};
template <int VW>
using Vec = typename VecType<VW>::type;
static_assert(sizeof(Vec<16>) == 64, "vector extension");

// The widest vector this machine's registers hold (floats), and how many
// accumulators fit in its vector registers beside the operands. A vector
// wider than the registers makes GCC spill every operation (20× slower).
#if defined(__AVX512F__)
constexpr int kWidth = 16, kAccumulators = 24;  // 32 zmm
#elif defined(__AVX__)
constexpr int kWidth = 8, kAccumulators = 12;  // 16 ymm
#elif defined(__aarch64__)
constexpr int kWidth = 4, kAccumulators = 24;  // 32 NEON q registers
#else
constexpr int kWidth = 4, kAccumulators = 12;  // 16 xmm (SSE)
#endif

// Register blocking for CO output channels: VW floats per vector, NV vectors
// per pixel, UR pixels of the forward and CB input channels of the kernel
// gradient in registers (CB a power of two: it divides any multiple of 8).
template <int CO>
struct Blocking {
  static constexpr int VW = CO < kWidth ? CO : kWidth;
  static constexpr int NV = CO / VW;
  static constexpr int UR = kAccumulators / NV < 1    ? 1
                            : kAccumulators / NV < 16 ? kAccumulators / NV
                                                      : 16;
  static constexpr int CB = kAccumulators / NV >= 8   ? 8
                            : kAccumulators / NV >= 4 ? 4
                            : kAccumulators / NV >= 2 ? 2
                                                      : 1;
};

template <int VW>
inline Vec<VW> load(const float* p) {
  Vec<VW> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <int VW>
inline void store(float* p, const Vec<VW>& v) {
  std::memcpy(p, &v, sizeof(v));
}

// Runs f(0) … f(n − 1) on the calling thread and the pool's threads. Tasks
// claim indices from a shared counter, so the caller never waits for a task
// that has not started (a pool whose threads are all busy elsewhere cannot
// deadlock it); a task that starts after the caller has returned finds no
// index left and touches only the counters it shares.
template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t n, const F& f) {
  struct Counters {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto counters = std::make_shared<Counters>();
  const F* body = &f;
  auto work = [counters, n, body]() {
    for (int64_t i; (i = counters->next.fetch_add(1)) < n;) {
      (*body)(i);
      counters->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(work)(work));
  work();
  while (counters->done.load(std::memory_order_acquire) < n) {
    std::this_thread::yield();
  }
}

// UR output pixels of one row, all CO = VW·NV output channels: xrow is the
// padded input at the block's first pixel, y the output's.
template <int VW, int NV, int UR>
inline void forward_block(const float* xrow, int64_t row_stride,
                          const float* w, float* y, int64_t ci) {
  constexpr int CO = VW * NV;
  Vec<VW> acc[UR][NV];
  for (int u = 0; u < UR; ++u)
    for (int v = 0; v < NV; ++v) acc[u][v] = Vec<VW>{};
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 3; ++j) {
      const float* xs = xrow + i * row_stride + j * ci;
      const float* wt = w + (i * 3 + j) * ci * CO;
      for (int64_t c = 0; c < ci; ++c) {
        Vec<VW> wv[NV];
        for (int v = 0; v < NV; ++v) wv[v] = load<VW>(wt + c * CO + v * VW);
#pragma GCC unroll 16
        for (int u = 0; u < UR; ++u) {
          const float xv = xs[u * ci + c];
          for (int v = 0; v < NV; ++v) acc[u][v] += xv * wv[v];
        }
      }
    }
  }
  for (int u = 0; u < UR; ++u)
    for (int v = 0; v < NV; ++v) store<VW>(y + u * CO + v * VW, acc[u][v]);
}

// The last r (< UR) pixels of a row, as one block of exactly r.
template <int VW, int NV, int R>
inline void forward_tail(int r, const float* xrow, int64_t row_stride,
                         const float* w, float* y, int64_t ci) {
  if constexpr (R > 0) {
    if (r == R) {
      forward_block<VW, NV, R>(xrow, row_stride, w, y, ci);
    } else {
      forward_tail<VW, NV, R - 1>(r, xrow, row_stride, w, y, ci);
    }
  }
}

template <typename B>
void forward(ffi::ThreadPool& pool, const float* xp, const float* w, float* y,
             int64_t n, int64_t h, int64_t wd, int64_t ci) {
  constexpr int VW = B::VW, NV = B::NV, UR = B::UR, CO = VW * NV;
  const int64_t row_stride = (wd + 2) * ci;
  auto row = [&](int64_t r) {  // r = image · h + output row
    const float* xrow = xp + ((r / h) * (h + 2) + r % h) * row_stride;
    float* yrow = y + r * wd * CO;
    int64_t x0 = 0;
    for (; x0 + UR <= wd; x0 += UR)
      forward_block<VW, NV, UR>(xrow + x0 * ci, row_stride, w, yrow + x0 * CO,
                                ci);
    if (x0 < wd)
      forward_tail<VW, NV, UR - 1>(static_cast<int>(wd - x0), xrow + x0 * ci,
                                   row_stride, w, yrow + x0 * CO, ci);
  };
  parallel_for(pool, n * h, row);
}

// Adds one image's kernel gradient into dw (3, 3, ci, CO). For each tap and
// block of CB input channels, CB × NV accumulators stay in registers over
// the image's pixels.
template <int VW, int NV, int CB>
void kernel_image(const float* xp, const float* dy, float* dw, int64_t h,
                  int64_t wd, int64_t ci) {
  constexpr int CO = VW * NV;
  const int64_t row_stride = (wd + 2) * ci;
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 3; ++j) {
      for (int64_t c0 = 0; c0 < ci; c0 += CB) {
        float* out = dw + ((i * 3 + j) * ci + c0) * CO;
        Vec<VW> acc[CB][NV];
        for (int c = 0; c < CB; ++c)
          for (int v = 0; v < NV; ++v) acc[c][v] = load<VW>(out + c * CO + v * VW);
        for (int64_t oh = 0; oh < h; ++oh) {
          const float* xs = xp + (oh + i) * row_stride + j * ci + c0;
          const float* g = dy + oh * wd * CO;
          for (int64_t x = 0; x < wd; ++x) {
            Vec<VW> gv[NV];
            for (int v = 0; v < NV; ++v) gv[v] = load<VW>(g + x * CO + v * VW);
#pragma GCC unroll 8
            for (int c = 0; c < CB; ++c) {
              const float xv = xs[x * ci + c];
              for (int v = 0; v < NV; ++v) acc[c][v] += xv * gv[v];
            }
          }
        }
        for (int c = 0; c < CB; ++c)
          for (int v = 0; v < NV; ++v) store<VW>(out + c * CO + v * VW, acc[c][v]);
      }
    }
  }
}

// Images are summed in GROUPS fixed groups, each into its own partial sum,
// and the partials added in order: the result does not depend on which
// thread took which group, nor on the number of threads (a resumed run
// reproduces its parameters bit for bit).
constexpr int64_t GROUPS = 8;

template <typename B>
void kernel_grad(ffi::ThreadPool& pool, const float* xp, const float* dy,
                 float* dw, int64_t n, int64_t h, int64_t wd, int64_t ci) {
  constexpr int VW = B::VW, NV = B::NV, CB = B::CB, CO = VW * NV;
  const int64_t size = 9 * ci * CO, groups = std::min(n, GROUPS);
  std::vector<float> partial(groups * size, 0.0f);
  auto group = [&](int64_t g) {
    for (int64_t b = g * n / groups; b < (g + 1) * n / groups; ++b)
      kernel_image<VW, NV, CB>(xp + b * (h + 2) * (wd + 2) * ci,
                               dy + b * h * wd * CO, partial.data() + g * size,
                               h, wd, ci);
  };
  parallel_for(pool, groups, group);
  std::copy(partial.begin(), partial.begin() + size, dw);
  for (int64_t g = 1; g < groups; ++g)
    for (int64_t k = 0; k < size; ++k) dw[k] += partial[g * size + k];
}

ffi::Error invalid(const char* what) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, what);
}

// f(Blocking<co>{}) for the output channel counts the kernels take.
template <typename F>
bool with_blocking(int64_t co, const F& f) {
  switch (co) {
    case 8: f(Blocking<8>{}); return true;
    case 16: f(Blocking<16>{}); return true;
    case 32: f(Blocking<32>{}); return true;
    case 64: f(Blocking<64>{}); return true;
    default: return false;
  }
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xp,
                       ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y) {
  auto xd = xp.dimensions();
  auto wdim = w.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 4 || wdim.size() != 4 || yd.size() != 4 ||
      wdim[0] != 3 || wdim[1] != 3 || wdim[2] != xd[3] ||
      yd[0] != xd[0] || yd[1] != xd[1] - 2 || yd[2] != xd[2] - 2 ||
      yd[3] != wdim[3] || xd[3] % 8 != 0)
    return invalid("KdConv3x3Forward: shapes do not match");
  const int64_t n = yd[0], h = yd[1], wd = yd[2], ci = xd[3], co = yd[3];
  const float* x = xp.typed_data();
  const float* k = w.typed_data();
  float* out = y->typed_data();
  if (!with_blocking(co, [&](auto b) {
        forward<decltype(b)>(pool, x, k, out, n, h, wd, ci);
      }))
    return invalid("KdConv3x3Forward: output channels 8, 16, 32 or 64");
  return ffi::Error::Success();
}

ffi::Error KernelImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xp,
                      ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dw) {
  auto xd = xp.dimensions();
  auto gd = dy.dimensions();
  auto wdim = dw->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || wdim.size() != 4 ||
      gd[0] != xd[0] || gd[1] != xd[1] - 2 || gd[2] != xd[2] - 2 ||
      wdim[0] != 3 || wdim[1] != 3 || wdim[2] != xd[3] || wdim[3] != gd[3] ||
      xd[3] % 8 != 0)
    return invalid("KdConv3x3Kernel: shapes do not match");
  const int64_t n = gd[0], h = gd[1], wd = gd[2], ci = xd[3], co = gd[3];
  const float* x = xp.typed_data();
  const float* g = dy.typed_data();
  float* out = dw->typed_data();
  if (!with_blocking(co, [&](auto b) {
        kernel_grad<decltype(b)>(pool, x, g, out, n, h, wd, ci);
      }))
    return invalid("KdConv3x3Kernel: output channels 8, 16, 32 or 64");
  return ffi::Error::Success();
}

}  // namespace

// Floats per vector register in this build: with fewer than 16, 64 output
// channels leave too few registers for a pixel block (one pixel at a time),
// and kd_jax.models.layers keeps those convolutions XLA's.
extern "C" int KdConv3x3VectorWidth() { return kWidth; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(KdConv3x3Forward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KdConv3x3Kernel, KernelImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
