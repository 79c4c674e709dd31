// The subset of NVIDIA's driver API types the emulated driver implements. The enum values
// come from cudarc's bindings of cuda.h (gen_cuda_enums.h, emu/tools/gen_from_cudarc.py),
// so they are the ones cudarc passes.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "gen_cuda_enums.h"

extern "C" {
typedef enum cudaError_enum CUresult;
typedef enum CUdevice_attribute_enum CUdevice_attribute;
typedef enum CUfunction_attribute_enum CUfunction_attribute;
typedef enum CUpointer_attribute_enum CUpointer_attribute;
typedef enum CUmemPool_attribute_enum CUmemPool_attribute;
typedef enum CUlimit_enum CUlimit;
typedef enum CUstreamCaptureStatus_enum CUstreamCaptureStatus;
typedef enum CUfunc_cache_enum CUfunc_cache;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct CUctx_st* CUcontext;
typedef struct CUmod_st* CUmodule;
typedef struct CUfunc_st* CUfunction;
typedef struct CUstream_st* CUstream;
typedef struct CUevent_st* CUevent;
typedef struct CUmemPoolHandle_st* CUmemoryPool;
typedef struct CUgraph_st* CUgraph;
typedef struct CUgraphExec_st* CUgraphExec;
typedef struct CUgraphNode_st* CUgraphNode;
typedef struct CUgraphEdgeData_st CUgraphEdgeData;
typedef struct CUuuid_st {
    char bytes[16];
} CUuuid;
typedef void (*CUhostFn)(void* userData);
}

#define CUDAAPI extern "C" __attribute__((visibility("default")))
