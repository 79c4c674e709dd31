//! The ResNet-LSTM topology over any [`crate::engine::Backend`]: torchvision's ResNet
//! (basic and bottleneck blocks), the stage-1 net (ResNet -> GAP -> LSTM -> 128-64-1 head per
//! slice), the stage-2 net (ResNet -> GAP -> fc), parameters with PyTorch's names, and
//! safetensors checkpoints. Nothing here knows about CT or files other than checkpoints.
