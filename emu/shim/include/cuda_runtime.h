// Satisfied by emu/shim/cuda_shim.h (force-included into every host-compiled kernel).
#pragma once
