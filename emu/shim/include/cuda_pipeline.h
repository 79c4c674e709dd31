// Satisfied by emu/shim/cuda_shim.h (emu_pipeline.h: the __pipeline_* primitives only).
#pragma once
