/* The decode kernel's matrix-vector product in C with AVX-512, in two weight layouts, for
 * benchmarks/matvec_stream.py --c (compiled there with gcc -O3 -march=native; not part of
 * the package). Rows of k floats, k a multiple of 64. */
#include <immintrin.h>
#include <stddef.h>

/* out[o] = w[o] . x, w [n, k] row-major: the layout and the loop of fused_kernel._dot. */
void rows(const float *w, const float *x, float *out, int n, int k) {
  for (int o = 0; o < n; o++) {
    const float *row = w + (size_t)o * k;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int i = 0; i < k; i += 64) {
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(row + i), _mm512_loadu_ps(x + i), a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(row + i + 16), _mm512_loadu_ps(x + i + 16), a1);
      a2 = _mm512_fmadd_ps(_mm512_loadu_ps(row + i + 32), _mm512_loadu_ps(x + i + 32), a2);
      a3 = _mm512_fmadd_ps(_mm512_loadu_ps(row + i + 48), _mm512_loadu_ps(x + i + 48), a3);
    }
    out[o] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  }
}

/* The same product over w packed as [n / 4, k / 16, 4, 16]: four rows' 16-float pieces
 * interleaved, so that the four rows are read as one sequential stream and each load of x
 * serves four of them. */
void packed4(const float *p, const float *x, float *out, int n, int k) {
  for (int g = 0; g < n / 4; g++) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int i = 0; i < k; i += 16, p += 64) {
      __m512 xs = _mm512_loadu_ps(x + i);
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(p), xs, a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(p + 16), xs, a1);
      a2 = _mm512_fmadd_ps(_mm512_loadu_ps(p + 32), xs, a2);
      a3 = _mm512_fmadd_ps(_mm512_loadu_ps(p + 48), xs, a3);
    }
    out[4 * g] = _mm512_reduce_add_ps(a0);
    out[4 * g + 1] = _mm512_reduce_add_ps(a1);
    out[4 * g + 2] = _mm512_reduce_add_ps(a2);
    out[4 * g + 3] = _mm512_reduce_add_ps(a3);
  }
}
