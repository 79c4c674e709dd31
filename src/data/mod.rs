//! From HU volumes to model input and back: the method's HU windows, in-plane resampling,
//! slice sequences, datasets (INSTANCE, ct-ich layouts, slice-label CSV), patient-wise
//! splits, and synthetic head-CT phantoms with exact masks. Nothing here runs the network.
