/* libcublas.so.12 forwarding to libcublas.so.13, for measurements only.
 *
 * The faiss-gpu-cu12 wheel links cuBLAS 12 and uses eight of its functions; a machine whose
 * image ships CUDA 13 alone (as the lent H200 does) has libcublas.so.13. This library carries
 * the soname and symbol version libcublas.so.12 and forwards each call to the same function of
 * cuBLAS 13, whose signatures for these eight are unchanged. Build:
 *   gcc -O2 -shared -fPIC -Wl,-soname,libcublas.so.12 -Wl,--version-script=cublas12.map \
 *       -o libcublas.so.12 cublas12_shim.c -ldl
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

static void *cublas13(const char *name) {
    static void *lib;
    if (!lib) lib = dlopen("libcublas.so.13", RTLD_NOW | RTLD_GLOBAL);
    void *fn = lib ? dlsym(lib, name) : NULL;
    if (!fn) {
        fprintf(stderr, "cublas12 shim: cannot find %s in libcublas.so.13 (%s)\n", name,
                dlerror());
        abort();
    }
    return fn;
}

#define FORWARD(ret, name, params, args)                   \
    ret name params {                                      \
        static ret(*fn) params;                            \
        if (!fn) fn = (ret(*) params)cublas13(#name);      \
        return fn args;                                    \
    }

typedef void *H;
FORWARD(int, cublasCreate_v2, (H *h), (h))
FORWARD(int, cublasDestroy_v2, (H h), (h))
FORWARD(int, cublasSetStream_v2, (H h, void *s), (h, s))
FORWARD(int, cublasGetMathMode, (H h, int *m), (h, m))
FORWARD(int, cublasSetMathMode, (H h, int m), (h, m))
FORWARD(int, cublasGemmEx,
        (H h, int ta, int tb, int m, int n, int k, const void *alpha, const void *A, int at,
         int lda, const void *B, int bt, int ldb, const void *beta, void *C, int ct, int ldc,
         int compute, int algo),
        (h, ta, tb, m, n, k, alpha, A, at, lda, B, bt, ldb, beta, C, ct, ldc, compute, algo))
FORWARD(int, cublasGemmStridedBatchedEx,
        (H h, int ta, int tb, int m, int n, int k, const void *alpha, const void *A, int at,
         int lda, long long sa, const void *B, int bt, int ldb, long long sb, const void *beta,
         void *C, int ct, int ldc, long long sc, int batch, int compute, int algo),
        (h, ta, tb, m, n, k, alpha, A, at, lda, sa, B, bt, ldb, sb, beta, C, ct, ldc, sc, batch,
         compute, algo))
FORWARD(int, cublasSgemmEx,
        (H h, int ta, int tb, int m, int n, int k, const float *alpha, const void *A, int at,
         int lda, const void *B, int bt, int ldb, const float *beta, void *C, int ct, int ldc),
        (h, ta, tb, m, n, k, alpha, A, at, lda, B, bt, ldb, beta, C, ct, ldc))
