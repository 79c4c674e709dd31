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
