//! From a trained stage-2 net's CAM to a hemorrhage mask: thresholding, k-means pseudo-masks
//! on the subdural window, dilation, 3-D connected components and their filter.
