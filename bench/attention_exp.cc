// Accuracy of the decode attention's vector exp (attention_exp in
// infer/kernels/int8_matvec.cc) against std::exp on every float in [-87.5, 0]: the largest
// distance in units in the last place and the largest relative error.
//
//   g++ -O3 -std=c++17 -w -march=native \
//       -I"$(.venv/bin/python -c 'import jax; print(jax.ffi.include_dir())')" \
//       bench/attention_exp.cc -o /tmp/attention_exp && /tmp/attention_exp
//
// The same with -march=x86-64-v3 checks the AVX2 path (the portable build uses std::exp).
#include "../infer/kernels/int8_matvec.cc"

#include <cstdio>
#include <cstdlib>
#include <vector>

int main() {
#if defined(HPLLM_PATH_AVX512) || defined(HPLLM_PATH_AVX2)
  std::vector<float> xs;
  for (float x = 0.0f; x >= -87.5f; x = std::nextafter(x, -100.0f)) xs.push_back(x);
  std::vector<float> ys(xs);
  exp_in_place(ys.data(), static_cast<int64_t>(ys.size()));
  int64_t worst_ulp = 0;
  float worst_x = 0.0f;
  double worst_relative = 0.0;
  for (size_t i = 0; i < xs.size(); ++i) {
    const float expected = std::exp(xs[i]);
    int32_t a, b;
    std::memcpy(&a, &expected, 4);
    std::memcpy(&b, &ys[i], 4);
    const int64_t ulp = std::llabs(int64_t{a} - b);
    if (ulp > worst_ulp) worst_ulp = ulp, worst_x = xs[i];
    worst_relative = std::max(worst_relative, std::fabs(double{ys[i]} - expected) / expected);
  }
  std::printf("%s path, %zu floats in [-87.5, 0]: largest difference %lld ulp (at %g), largest "
              "relative error %.2e\n", HpllmKernelPath(), xs.size(),
              static_cast<long long>(worst_ulp), worst_x, worst_relative);
#else
  std::printf("the portable build uses std::exp\n");
#endif
}
