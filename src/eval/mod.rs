//! Metrics (Dice, IoU, precision, recall, HD95, relative volume difference, per-slice Dice)
//! and reports. Knows masks and spacings, nothing of the network.
