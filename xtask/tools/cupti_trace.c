// A CUPTI activity tracer the CUDA driver loads into a process (CUDA_INJECTION64_PATH; built and
// run by cupti_trace.sh): every kernel, memcpy and memset, and with TRACE_API set every driver
// call, to $TRACE_OUT as CSV lines (kind,start ns,end ns,stream or thread,name or bytes) at exit.
// KERNEL_T, MEMCPY_T and MEMSET_T name the newest record structs of the CUPTI it is built with.
#include <cupti.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static FILE *out;

static void CUPTIAPI requested(uint8_t **buf, size_t *size, size_t *max) {
    *size = 8 << 20;
    *buf = (uint8_t *)aligned_alloc(8, *size);
    *max = 0;
}

static void CUPTIAPI completed(CUcontext ctx, uint32_t stream, uint8_t *buf, size_t size, size_t valid) {
    CUpti_Activity *r = NULL;
    while (cuptiActivityGetNextRecord(buf, valid, &r) == CUPTI_SUCCESS) {
        switch (r->kind) {
        case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL:
        case CUPTI_ACTIVITY_KIND_KERNEL: {
            KERNEL_T *k = (KERNEL_T *)r;
            fprintf(out, "K,%llu,%llu,%u,%s\n", (unsigned long long)k->start, (unsigned long long)k->end,
                    k->streamId, k->name);
            break;
        }
        case CUPTI_ACTIVITY_KIND_MEMCPY: {
            MEMCPY_T *m = (MEMCPY_T *)r;
            fprintf(out, "M%u,%llu,%llu,%u,%llu\n", m->copyKind, (unsigned long long)m->start,
                    (unsigned long long)m->end, m->streamId, (unsigned long long)m->bytes);
            break;
        }
        case CUPTI_ACTIVITY_KIND_MEMSET: {
            MEMSET_T *m = (MEMSET_T *)r;
            fprintf(out, "S,%llu,%llu,%u,%llu\n", (unsigned long long)m->start, (unsigned long long)m->end,
                    m->streamId, (unsigned long long)m->bytes);
            break;
        }
        case CUPTI_ACTIVITY_KIND_DRIVER: {
            CUpti_ActivityAPI *a = (CUpti_ActivityAPI *)r;
            const char *name = "?";
            cuptiGetCallbackName(CUPTI_CB_DOMAIN_DRIVER_API, a->cbid, &name);
            fprintf(out, "D,%llu,%llu,%u,%s\n", (unsigned long long)a->start, (unsigned long long)a->end,
                    a->threadId, name);
            break;
        }
        default:
            break;
        }
    }
    free(buf);
}

static void finish(void) {
    cuptiActivityFlushAll(1);
    if (out) fclose(out);
}

int InitializeInjection(void) {
    const char *path = getenv("TRACE_OUT");
    out = fopen(path ? path : "trace.csv", "w");
    cuptiActivityRegisterCallbacks(requested, completed);
    cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
    cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY);
    cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET);
    if (getenv("TRACE_API")) cuptiActivityEnable(CUPTI_ACTIVITY_KIND_DRIVER);
    atexit(finish);
    return 1;
}
