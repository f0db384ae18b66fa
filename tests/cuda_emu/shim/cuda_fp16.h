// Emulation shim: everything lives in the force-included tests/cuda_emu/cuda_emu.h.
#pragma once
