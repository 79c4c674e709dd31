//! The two training stages of the method: stage 1 (ResNet-LSTM on slice sequences, slice
//! labels only) and stage 2 (frozen backbone, single-slice fc head); optimizers' schedules,
//! augmentation, validation, checkpoints and resume, logs.
