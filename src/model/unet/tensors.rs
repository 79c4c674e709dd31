//! The U-Net's tensors as named structs (llm.c's ParameterTensors): [`Weights`] holds every
//! trainable tensor by name (the same struct holds the gradients and the optimizer's
//! moments), [`Stats`] the batch-norm running statistics. Each walks its fields in PyTorch's
//! `state_dict` order with PyTorch's names (`encoder1.enc1conv1.weight`,
//! `bottleneck.bottlenecknorm2.running_var`, `upconv4.bias`, `decoder1.dec1norm2.weight`,
//! `seg.weight`) and shapes. Knows nothing about buffers or backends: `X` is any value.

use super::config::UNetConfig;
use crate::model::ModelError;

/// How a tensor starts (PyTorch's defaults).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// uniform(-bound, bound): Conv2d's and ConvTranspose2d's weights and biases
    /// (kaiming_uniform(a = sqrt(5)) = 1/sqrt(fan_in)).
    Uniform(f64),
    Constant(f64),
}

/// A tensor's name, shape and initialisation.
#[derive(Clone, Debug, PartialEq)]
pub struct Spec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

/// One conv3x3(bias) -> ReLU -> BatchNorm unit.
#[derive(Clone, Debug)]
pub struct Unit<X> {
    pub conv_weight: X,
    pub conv_bias: X,
    pub norm_weight: X,
    pub norm_bias: X,
}

/// Two units: an encoder, decoder or the bottleneck block.
#[derive(Clone, Debug)]
pub struct Block<X> {
    pub unit1: Unit<X>,
    pub unit2: Unit<X>,
}

/// A ConvTranspose2d 2x2/2.
#[derive(Clone, Debug)]
pub struct Up<X> {
    pub weight: X,
    pub bias: X,
}

/// Every trainable tensor. `encoders[l]`, `upconvs[l]`, `decoders[l]` are level `l`
/// (PyTorch's `encoder{l+1}`, `upconv{l+1}`, `decoder{l+1}`; `upconvs[l]` goes from level
/// `l + 1`, or the bottleneck, up to level `l`).
#[derive(Clone, Debug)]
pub struct Weights<X> {
    pub encoders: Vec<Block<X>>,
    pub bottleneck: Block<X>,
    pub upconvs: Vec<Up<X>>,
    pub decoders: Vec<Block<X>>,
    pub seg_weight: X,
    pub seg_bias: X,
}

/// A batch norm's running statistics.
#[derive(Clone, Debug)]
pub struct RunningStats<X> {
    pub mean: X,
    pub var: X,
}

/// The running statistics of a block's two batch norms.
#[derive(Clone, Debug)]
pub struct BlockStats<X> {
    pub norm1: RunningStats<X>,
    pub norm2: RunningStats<X>,
}

/// Every running statistic.
#[derive(Clone, Debug)]
pub struct Stats<X> {
    pub encoders: Vec<BlockStats<X>>,
    pub bottleneck: BlockStats<X>,
    pub decoders: Vec<BlockStats<X>>,
}

/// A block's PyTorch module name, its layer prefix and its channels.
#[derive(Clone, Debug)]
pub struct BlockDesc {
    pub module: String,
    pub prefix: String,
    pub c_in: usize,
    pub c_out: usize,
}

/// The blocks of a config: (encoders by level, bottleneck, decoders by level).
pub fn blocks(cfg: &UNetConfig) -> (Vec<BlockDesc>, BlockDesc, Vec<BlockDesc>) {
    let d = cfg.depth;
    let enc = (0..d)
        .map(|l| BlockDesc {
            module: format!("encoder{}", l + 1),
            prefix: format!("enc{}", l + 1),
            c_in: if l == 0 {
                cfg.in_channels
            } else {
                cfg.channels(l - 1)
            },
            c_out: cfg.channels(l),
        })
        .collect();
    let bottleneck = BlockDesc {
        module: "bottleneck".into(),
        prefix: "bottleneck".into(),
        c_in: cfg.channels(d - 1),
        c_out: cfg.channels(d),
    };
    let dec = (0..d)
        .map(|l| BlockDesc {
            module: format!("decoder{}", l + 1),
            prefix: format!("dec{}", l + 1),
            c_in: 2 * cfg.channels(l),
            c_out: cfg.channels(l),
        })
        .collect();
    (enc, bottleneck, dec)
}

fn conv_bound(fan_in: usize) -> Init {
    Init::Uniform(1.0 / (fan_in.max(1) as f64).sqrt())
}

fn unit_specs(b: &BlockDesc, k: usize, c_in: usize) -> Vec<Spec> {
    let conv = format!("{}.{}conv{k}", b.module, b.prefix);
    let norm = format!("{}.{}norm{k}", b.module, b.prefix);
    let bound = conv_bound(c_in * 9);
    vec![
        Spec {
            name: format!("{conv}.weight"),
            shape: vec![b.c_out, c_in, 3, 3],
            init: bound,
        },
        Spec {
            name: format!("{conv}.bias"),
            shape: vec![b.c_out],
            init: bound,
        },
        Spec {
            name: format!("{norm}.weight"),
            shape: vec![b.c_out],
            init: Init::Constant(1.0),
        },
        Spec {
            name: format!("{norm}.bias"),
            shape: vec![b.c_out],
            init: Init::Constant(0.0),
        },
    ]
}

fn block_specs(b: &BlockDesc) -> Vec<Spec> {
    let mut v = unit_specs(b, 1, b.c_in);
    v.extend(unit_specs(b, 2, b.c_out));
    v
}

fn up_specs(cfg: &UNetConfig, l: usize) -> Vec<Spec> {
    let (c_in, c_out) = (cfg.channels(l + 1), cfg.channels(l));
    // ConvTranspose2d's fan_in is computed from weight.size(1) = c_out.
    let bound = conv_bound(c_out * 4);
    vec![
        Spec {
            name: format!("upconv{}.weight", l + 1),
            shape: vec![c_in, c_out, 2, 2],
            init: bound,
        },
        Spec {
            name: format!("upconv{}.bias", l + 1),
            shape: vec![c_out],
            init: bound,
        },
    ]
}

fn stat_specs(b: &BlockDesc) -> Vec<Spec> {
    let mut v = Vec::new();
    for k in 1..=2 {
        let norm = format!("{}.{}norm{k}", b.module, b.prefix);
        v.push(Spec {
            name: format!("{norm}.running_mean"),
            shape: vec![b.c_out],
            init: Init::Constant(0.0),
        });
        v.push(Spec {
            name: format!("{norm}.running_var"),
            shape: vec![b.c_out],
            init: Init::Constant(1.0),
        });
    }
    v
}

impl<X> Unit<X> {
    fn take(it: &mut impl Iterator<Item = X>) -> Option<Self> {
        Some(Unit {
            conv_weight: it.next()?,
            conv_bias: it.next()?,
            norm_weight: it.next()?,
            norm_bias: it.next()?,
        })
    }
    fn refs(&self) -> [&X; 4] {
        [
            &self.conv_weight,
            &self.conv_bias,
            &self.norm_weight,
            &self.norm_bias,
        ]
    }
    fn muts(&mut self) -> [&mut X; 4] {
        [
            &mut self.conv_weight,
            &mut self.conv_bias,
            &mut self.norm_weight,
            &mut self.norm_bias,
        ]
    }
}

impl<X> Block<X> {
    fn take(it: &mut impl Iterator<Item = X>) -> Option<Self> {
        Some(Block {
            unit1: Unit::take(it)?,
            unit2: Unit::take(it)?,
        })
    }
    fn refs(&self) -> impl Iterator<Item = &X> {
        self.unit1.refs().into_iter().chain(self.unit2.refs())
    }
    fn muts(&mut self) -> impl Iterator<Item = &mut X> {
        self.unit1.muts().into_iter().chain(self.unit2.muts())
    }
}

impl<X> BlockStats<X> {
    fn take(it: &mut impl Iterator<Item = X>) -> Option<Self> {
        Some(BlockStats {
            norm1: RunningStats {
                mean: it.next()?,
                var: it.next()?,
            },
            norm2: RunningStats {
                mean: it.next()?,
                var: it.next()?,
            },
        })
    }
    fn refs(&self) -> [&X; 4] {
        [
            &self.norm1.mean,
            &self.norm1.var,
            &self.norm2.mean,
            &self.norm2.var,
        ]
    }
    fn muts(&mut self) -> [&mut X; 4] {
        [
            &mut self.norm1.mean,
            &mut self.norm1.var,
            &mut self.norm2.mean,
            &mut self.norm2.var,
        ]
    }
}

fn short(what: &str) -> ModelError {
    ModelError::Internal(format!("too few {what} tensors for the U-Net config"))
}

impl<X> Weights<X> {
    /// Every trainable tensor's spec, in the order of [`Weights::refs`]: state_dict order
    /// (encoders, bottleneck, then `upconv{l}` and `decoder{l}` from the deepest level up,
    /// then `seg`).
    pub fn specs(cfg: &UNetConfig) -> Vec<Spec> {
        let (enc, bott, dec) = blocks(cfg);
        let mut v: Vec<Spec> = enc.iter().flat_map(block_specs).collect();
        v.extend(block_specs(&bott));
        for l in (0..cfg.depth).rev() {
            v.extend(up_specs(cfg, l));
            v.extend(block_specs(&dec[l]));
        }
        let bound = conv_bound(cfg.features);
        v.push(Spec {
            name: "seg.weight".into(),
            shape: vec![cfg.out_channels, cfg.features, 1, 1],
            init: bound,
        });
        v.push(Spec {
            name: "seg.bias".into(),
            shape: vec![cfg.out_channels],
            init: bound,
        });
        v
    }

    /// Builds the struct from one value per spec, in [`Weights::specs`] order.
    pub fn from_values(cfg: &UNetConfig, values: Vec<X>) -> Result<Self, ModelError> {
        let d = cfg.depth;
        let mut it = values.into_iter();
        let it = &mut it;
        let encoders = (0..d)
            .map(|_| Block::take(it).ok_or_else(|| short("encoder")))
            .collect::<Result<Vec<_>, _>>()?;
        let bottleneck = Block::take(it).ok_or_else(|| short("bottleneck"))?;
        let mut ups = Vec::with_capacity(d);
        let mut decs = Vec::with_capacity(d);
        for _ in 0..d {
            let weight = it.next().ok_or_else(|| short("upconv"))?;
            let bias = it.next().ok_or_else(|| short("upconv"))?;
            ups.push(Up { weight, bias });
            decs.push(Block::take(it).ok_or_else(|| short("decoder"))?);
        }
        // Built deepest level first: index by level.
        ups.reverse();
        decs.reverse();
        let seg_weight = it.next().ok_or_else(|| short("seg"))?;
        let seg_bias = it.next().ok_or_else(|| short("seg"))?;
        if it.next().is_some() {
            return Err(ModelError::Internal(
                "more tensors than the U-Net config has".into(),
            ));
        }
        Ok(Weights {
            encoders,
            bottleneck,
            upconvs: ups,
            decoders: decs,
            seg_weight,
            seg_bias,
        })
    }

    /// Every tensor in [`Weights::specs`] order.
    pub fn refs(&self) -> Vec<&X> {
        let mut v: Vec<&X> = self.encoders.iter().flat_map(|b| b.refs()).collect();
        v.extend(self.bottleneck.refs());
        for (u, d) in self.upconvs.iter().zip(&self.decoders).rev() {
            v.push(&u.weight);
            v.push(&u.bias);
            v.extend(d.refs());
        }
        v.push(&self.seg_weight);
        v.push(&self.seg_bias);
        v
    }

    /// Every tensor in [`Weights::specs`] order, mutably.
    pub fn muts(&mut self) -> Vec<&mut X> {
        let mut v: Vec<&mut X> = self.encoders.iter_mut().flat_map(|b| b.muts()).collect();
        v.extend(self.bottleneck.muts());
        for (u, d) in self.upconvs.iter_mut().zip(self.decoders.iter_mut()).rev() {
            v.push(&mut u.weight);
            v.push(&mut u.bias);
            v.extend(d.muts());
        }
        v.push(&mut self.seg_weight);
        v.push(&mut self.seg_bias);
        v
    }

    /// Builds the struct by calling `f` on every spec in order.
    pub fn try_build(
        cfg: &UNetConfig,
        mut f: impl FnMut(usize, &Spec) -> Result<X, ModelError>,
    ) -> Result<Self, ModelError> {
        let values = Self::specs(cfg)
            .iter()
            .enumerate()
            .map(|(i, s)| f(i, s))
            .collect::<Result<Vec<_>, _>>()?;
        Self::from_values(cfg, values)
    }
}

impl<X> Stats<X> {
    /// Every running statistic's spec, in the order of [`Stats::refs`].
    pub fn specs(cfg: &UNetConfig) -> Vec<Spec> {
        let (enc, bott, dec) = blocks(cfg);
        let mut v: Vec<Spec> = enc.iter().flat_map(stat_specs).collect();
        v.extend(stat_specs(&bott));
        for d in dec.iter().rev() {
            v.extend(stat_specs(d));
        }
        v
    }

    pub fn from_values(cfg: &UNetConfig, values: Vec<X>) -> Result<Self, ModelError> {
        let d = cfg.depth;
        let mut it = values.into_iter();
        let it = &mut it;
        let encoders = (0..d)
            .map(|_| BlockStats::take(it).ok_or_else(|| short("running-stat")))
            .collect::<Result<Vec<_>, _>>()?;
        let bottleneck = BlockStats::take(it).ok_or_else(|| short("running-stat"))?;
        let mut decoders = (0..d)
            .map(|_| BlockStats::take(it).ok_or_else(|| short("running-stat")))
            .collect::<Result<Vec<_>, _>>()?;
        decoders.reverse();
        if it.next().is_some() {
            return Err(ModelError::Internal(
                "more running statistics than the U-Net config has".into(),
            ));
        }
        Ok(Stats {
            encoders,
            bottleneck,
            decoders,
        })
    }

    pub fn refs(&self) -> Vec<&X> {
        let mut v: Vec<&X> = self.encoders.iter().flat_map(|b| b.refs()).collect();
        v.extend(self.bottleneck.refs());
        for d in self.decoders.iter().rev() {
            v.extend(d.refs());
        }
        v
    }

    pub fn muts(&mut self) -> Vec<&mut X> {
        let mut v: Vec<&mut X> = self.encoders.iter_mut().flat_map(|b| b.muts()).collect();
        v.extend(self.bottleneck.muts());
        for d in self.decoders.iter_mut().rev() {
            v.extend(d.muts());
        }
        v
    }

    pub fn try_build(
        cfg: &UNetConfig,
        mut f: impl FnMut(usize, &Spec) -> Result<X, ModelError>,
    ) -> Result<Self, ModelError> {
        let values = Self::specs(cfg)
            .iter()
            .enumerate()
            .map(|(i, s)| f(i, s))
            .collect::<Result<Vec<_>, _>>()?;
        Self::from_values(cfg, values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_order_follow_pytorch() {
        let cfg = UNetConfig {
            features: 4,
            ..UNetConfig::authors(3)
        };
        let specs = Weights::<()>::specs(&cfg);
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names[0], "encoder1.enc1conv1.weight");
        assert_eq!(specs[0].shape, vec![4, 3, 3, 3]);
        assert_eq!(names[7], "encoder1.enc1norm2.bias");
        assert!(names.contains(&"bottleneck.bottleneckconv2.weight"));
        let up4 = names.iter().position(|n| *n == "upconv4.weight").unwrap();
        assert_eq!(specs[up4].shape, vec![64, 32, 2, 2]);
        assert_eq!(names[up4 + 2], "decoder4.dec4conv1.weight");
        assert_eq!(specs[up4 + 2].shape, vec![32, 64, 3, 3]);
        assert_eq!(names[names.len() - 2], "seg.weight");
        assert_eq!(specs[specs.len() - 2].shape, vec![1, 4, 1, 1]);
        // 5 blocks x 2 units x 4 + 4 up-convs x 2 + 4 decoder blocks x 8 + seg 2.
        assert_eq!(specs.len(), 5 * 8 + 4 * 2 + 4 * 8 + 2);
        let stats = Stats::<()>::specs(&cfg);
        assert_eq!(stats.len(), 9 * 4);
        assert_eq!(stats[0].name, "encoder1.enc1norm1.running_mean");
        assert_eq!(
            stats[stats.len() - 1].name,
            "decoder1.dec1norm2.running_var"
        );

        // refs() walks the same order as specs(): tag each tensor with its index.
        let w = Weights::try_build(&cfg, |i, _| Ok(i)).unwrap();
        let order: Vec<usize> = w.refs().into_iter().copied().collect();
        assert_eq!(order, (0..specs.len()).collect::<Vec<_>>());
        assert_eq!(w.upconvs[3].weight, up4);
        assert_eq!(w.decoders[0].unit1.conv_weight, specs.len() - 10);
        let s = Stats::try_build(&cfg, |i, _| Ok(i)).unwrap();
        let order: Vec<usize> = s.refs().into_iter().copied().collect();
        assert_eq!(order, (0..stats.len()).collect::<Vec<_>>());
        assert_eq!(s.decoders[0].norm2.var, stats.len() - 1);
    }
}
