//! Shape descriptors of the ops: plain numbers, shared by every backend.

/// 2-D convolution without bias. x `[n, c_in, h, w]`, weight `[c_out, c_in, kh, kw]`,
/// y `[n, c_out, out_h, out_w]`, all contiguous row-major (NCHW).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Conv2d {
    pub n: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
}

impl Conv2d {
    pub fn out_h(&self) -> usize {
        (self.h + 2 * self.pad - self.kh) / self.stride + 1
    }
    pub fn out_w(&self) -> usize {
        (self.w + 2 * self.pad - self.kw) / self.stride + 1
    }
    pub fn x_len(&self) -> usize {
        self.n * self.c_in * self.h * self.w
    }
    pub fn w_len(&self) -> usize {
        self.c_out * self.c_in * self.kh * self.kw
    }
    pub fn y_len(&self) -> usize {
        self.n * self.c_out * self.out_h() * self.out_w()
    }
    /// Multiply-adds of the forward pass (the same count for each backward pass).
    pub fn macs(&self) -> usize {
        self.y_len() * self.c_in * self.kh * self.kw
    }
}

/// Max pooling (the stem's 3x3 stride 2 pad 1, but any k/stride/pad). Padding is -inf.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Pool2d {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl Pool2d {
    pub fn out_h(&self) -> usize {
        (self.h + 2 * self.pad - self.k) / self.stride + 1
    }
    pub fn out_w(&self) -> usize {
        (self.w + 2 * self.pad - self.k) / self.stride + 1
    }
    pub fn x_len(&self) -> usize {
        self.n * self.c * self.h * self.w
    }
    pub fn y_len(&self) -> usize {
        self.n * self.c * self.out_h() * self.out_w()
    }
}

/// Batch norm over x `[n, c, hw]` (statistics per channel over n and hw).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNorm2d {
    pub n: usize,
    pub c: usize,
    pub hw: usize,
    pub eps: f64,
    /// PyTorch's momentum: running = (1 - momentum) * running + momentum * batch.
    pub momentum: f64,
}

impl BatchNorm2d {
    pub fn len(&self) -> usize {
        self.n * self.c * self.hw
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One unidirectional LSTM layer, batch_first: x `[batch, seq, input]` -> h `[batch, seq, hidden]`.
/// PyTorch's gate order i, f, g, o; `w_ih [4*hidden, input]`, `w_hh [4*hidden, hidden]`,
/// `b_ih [4*hidden]`, `b_hh [4*hidden]`; zero initial state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Lstm {
    pub batch: usize,
    pub seq: usize,
    pub input: usize,
    pub hidden: usize,
}

impl Lstm {
    pub fn x_len(&self) -> usize {
        self.batch * self.seq * self.input
    }
    pub fn h_len(&self) -> usize {
        self.batch * self.seq * self.hidden
    }
    pub fn gates_len(&self) -> usize {
        self.batch * self.seq * 4 * self.hidden
    }
}

/// Transposed convolution whose kernel equals its stride (PyTorch's
/// `ConvTranspose2d(c_in, c_out, k, stride=k)`, the U-Net's 2x2/2 up-convolution), with bias.
/// x `[n, c_in, h, w]`, weight `[c_in, c_out, k, k]` (PyTorch's layout), bias `[c_out]`; the
/// output `[n, c_out, k*h, k*w]` is channels `y_offset..y_offset + c_out` of a wider buffer
/// y `[n, y_channels, k*h, k*w]` (the U-Net writes it straight into its concatenation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UpConv2d {
    pub n: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub k: usize,
    pub y_channels: usize,
    pub y_offset: usize,
}

impl UpConv2d {
    pub fn out_h(&self) -> usize {
        self.k * self.h
    }
    pub fn out_w(&self) -> usize {
        self.k * self.w
    }
    pub fn x_len(&self) -> usize {
        self.n * self.c_in * self.h * self.w
    }
    pub fn w_len(&self) -> usize {
        self.c_in * self.c_out * self.k * self.k
    }
    /// Length of the whole (wider) output buffer.
    pub fn y_len(&self) -> usize {
        self.n * self.y_channels * self.out_h() * self.out_w()
    }
}

/// `c` channels copied between two `[n, *, hw]` buffers: channels `src_offset..` of a
/// `src_channels`-channel source into channels `dst_offset..` of a `dst_channels`-channel
/// destination (the U-Net's skip concatenation, and its split in the backward pass).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChannelCopy {
    pub n: usize,
    pub hw: usize,
    pub c: usize,
    pub src_channels: usize,
    pub src_offset: usize,
    pub dst_channels: usize,
    pub dst_offset: usize,
}

impl ChannelCopy {
    pub fn src_len(&self) -> usize {
        self.n * self.src_channels * self.hw
    }
    pub fn dst_len(&self) -> usize {
        self.n * self.dst_channels * self.hw
    }
}

/// The soft Dice loss over probabilities `[n, c, hw]`:
/// `1 - mean_c(2 * sum(p * t) / (sum(p + t) + eps))`, sums over the batch and the pixels.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SoftDice {
    pub n: usize,
    pub c: usize,
    pub hw: usize,
    pub eps: f64,
}

impl SoftDice {
    pub fn len(&self) -> usize {
        self.n * self.c * self.hw
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
