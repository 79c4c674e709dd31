//! A second handle on a backend's device: the stage-3 U-Net owns its backend like the
//! ResNet-LSTM does, so a pipeline holding both (training's stage 3, segmentation) opens a
//! second handle on the same device for it. Buffers never pass between two handles except
//! through the host. Knows nothing about the networks.

use crate::engine::cpu::CpuBackend;
use crate::engine::cuda::CudaBackend;
use crate::engine::{Backend, EngineError, Real};

/// A backend that can open another handle on its own device.
pub trait SecondHandle: Backend + Sized {
    fn second_handle(&self) -> Result<Self, EngineError>;
}

impl<T: Real> SecondHandle for CpuBackend<T> {
    fn second_handle(&self) -> Result<Self, EngineError> {
        Ok(*self)
    }
}

impl SecondHandle for CudaBackend {
    fn second_handle(&self) -> Result<Self, EngineError> {
        CudaBackend::new(self.info().ordinal)
    }
}
