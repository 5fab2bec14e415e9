//! The image classifiers of McMahan et al. 2017: logistic regression, the
//! 2NN and the CNN, on a fixed input shape.

use std::fmt;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::TensorSpec;

/// The architectures Covey can train. The server sends one in every task,
/// so clients build exactly the model whose weights they receive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Architecture {
    /// Multinomial logistic regression on the flattened input.
    LogReg,
    /// McMahan et al. 2017 "2NN": two hidden layers of 200 with ReLU.
    Mlp2nn,
    /// McMahan et al. 2017 CNN: 5x5 conv 32, pool, 5x5 conv 64, pool,
    /// FC 512 ReLU, FC classes ('same' padding).
    Cnn,
}

impl std::str::FromStr for Architecture {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "logreg" => Ok(Self::LogReg),
            "2nn" => Ok(Self::Mlp2nn),
            "cnn" => Ok(Self::Cnn),
            other => Err(format!(
                "unknown model '{other}': expected logreg, 2nn or cnn"
            )),
        }
    }
}

impl Architecture {
    pub fn name(self) -> &'static str {
        match self {
            Self::LogReg => "logreg",
            Self::Mlp2nn => "2nn",
            Self::Cnn => "cnn",
        }
    }
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Shape of one input example.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputShape {
    pub channels: u32,
    pub height: u32,
    pub width: u32,
}

impl InputShape {
    pub const MNIST: Self = Self {
        channels: 1,
        height: 28,
        width: 28,
    };

    pub fn features(&self) -> usize {
        self.channels as usize * self.height as usize * self.width as usize
    }
}

/// A classifier: architecture, input shape and number of classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassifierSpec {
    pub architecture: Architecture,
    pub input: InputShape,
    pub classes: u32,
}

impl ClassifierSpec {
    pub fn mnist(architecture: Architecture) -> Self {
        Self {
            architecture,
            input: InputShape::MNIST,
            classes: 10,
        }
    }

    /// Tensors in wire order; names follow candle's `VarBuilder` paths.
    pub fn tensors(&self) -> Vec<TensorSpec> {
        let features = self.input.features();
        let classes = self.classes as usize;
        match self.architecture {
            Architecture::LogReg => vec![
                TensorSpec::new("fc.weight", &[classes, features]),
                TensorSpec::new("fc.bias", &[classes]),
            ],
            Architecture::Mlp2nn => vec![
                TensorSpec::new("fc1.weight", &[200, features]),
                TensorSpec::new("fc1.bias", &[200]),
                TensorSpec::new("fc2.weight", &[200, 200]),
                TensorSpec::new("fc2.bias", &[200]),
                TensorSpec::new("fc3.weight", &[classes, 200]),
                TensorSpec::new("fc3.bias", &[classes]),
            ],
            Architecture::Cnn => {
                let channels = self.input.channels as usize;
                let pooled = (self.input.height as usize / 4) * (self.input.width as usize / 4);
                vec![
                    TensorSpec::new("conv1.weight", &[32, channels, 5, 5]),
                    TensorSpec::new("conv1.bias", &[32]),
                    TensorSpec::new("conv2.weight", &[64, 32, 5, 5]),
                    TensorSpec::new("conv2.bias", &[64]),
                    TensorSpec::new("fc1.weight", &[512, 64 * pooled]),
                    TensorSpec::new("fc1.bias", &[512]),
                    TensorSpec::new("fc2.weight", &[classes, 512]),
                    TensorSpec::new("fc2.bias", &[classes]),
                ]
            }
        }
    }

    pub fn param_count(&self) -> usize {
        self.tensors().iter().map(TensorSpec::len).sum()
    }

    /// Deterministic initial weights, as PyTorch initialises Linear and
    /// Conv2d: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases.
    pub fn initial_weights(&self, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let tensors = self.tensors();
        let mut out = Vec::with_capacity(self.param_count());
        let mut fan_in = 1;
        for t in &tensors {
            if t.shape.len() > 1 {
                fan_in = t.shape.iter().skip(1).product::<usize>().max(1);
            }
            let bound = 1.0 / (fan_in as f32).sqrt();
            out.extend((0..t.len()).map(|_| rng.random_range(-bound..bound)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_counts_match_the_fedavg_paper() {
        assert_eq!(
            ClassifierSpec::mnist(Architecture::Cnn).param_count(),
            1_663_370
        );
        assert_eq!(
            ClassifierSpec::mnist(Architecture::Mlp2nn).param_count(),
            199_210
        );
        assert_eq!(
            ClassifierSpec::mnist(Architecture::LogReg).param_count(),
            7_850
        );
    }

    #[test]
    fn initial_weights_are_seeded_and_bounded() {
        let spec = ClassifierSpec::mnist(Architecture::LogReg);
        let a = spec.initial_weights(1);
        assert_eq!(a, spec.initial_weights(1));
        assert_ne!(a, spec.initial_weights(2));
        let bound = 1.0 / 784f32.sqrt();
        assert!(a.iter().all(|v| v.abs() <= bound));
    }

    #[test]
    fn architecture_names_round_trip() {
        for a in [
            Architecture::LogReg,
            Architecture::Mlp2nn,
            Architecture::Cnn,
        ] {
            assert_eq!(a.to_string().parse::<Architecture>().unwrap(), a);
        }
        assert!("resnet".parse::<Architecture>().is_err());
    }
}
