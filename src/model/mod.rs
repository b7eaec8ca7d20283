//! Decoder models from local Hugging Face folders: loading, hooked forward passes, tokenizer,
//! generation.

pub mod arch;
pub mod config;
pub mod generate;
pub mod hooks;
mod kernels;
pub mod layers;
pub mod tokenizer;
pub mod weights;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};

pub use config::ConfigFile;
pub use hooks::{ActivationCache, HookPoint, Hooks, Intervention, InterventionOp, Stash};
pub use layers::{Dims, KvCache, Transformer, WeightSource};
pub use tokenizer::Tokenizer;

use crate::error::{Error, Result};
use hooks::HookRunner;
use weights::Weights;

/// A loaded model: architecture, weights, tokenizer. Cloning is cheap (tensors share their
/// storage), and an edit of a clone replaces tensors, leaving the original as it was.
#[derive(Clone)]
pub struct Model {
    pub dir: PathBuf,
    pub model_type: String,
    pub transformer: Transformer,
    pub tokenizer: Tokenizer,
    pub device: Device,
    pub dtype: DType,
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    hook_points: Vec<HookPoint>,
    /// The folder's content hash, computed on first use: hashing a large model's weights
    /// takes seconds, and caches, exports and edit logs each ask for it.
    content_hash: std::sync::OnceLock<String>,
}

/// What a forward pass returns.
pub struct ForwardOutput {
    /// `[batch, seq, vocab]`.
    pub logits: Tensor,
    pub cache: ActivationCache,
    /// Leaves for the hooks requested with [`Hooks::grad`].
    pub grad_leaves: HashMap<HookPoint, Var>,
}

impl ForwardOutput {
    /// The leaf whose gradient is the gradient w.r.t. the value at `point`.
    pub fn grad_leaf(&self, point: HookPoint) -> Option<&Tensor> {
        self.grad_leaves.get(&point).map(|v| v.as_tensor())
    }
}

impl Model {
    /// Loads `config.json`, the safetensors weights and `tokenizer.json` from `dir`.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::MissingFile {
                path: dir.to_path_buf(),
                what: "model directory",
            });
        }
        let config = ConfigFile::read(dir)?;
        let model_type = config.model_type()?.to_string();
        // A multimodal checkpoint runs as its language model.
        let wrapped = arch::language_model(&config)?;
        let decoder = wrapped.as_ref().map_or(&config, |(text, _)| text);
        let decoder_type = match &wrapped {
            Some(_) => decoder.model_type().map_err(arch::in_text_config)?,
            None => &model_type,
        };
        let load = arch::loader(decoder_type).ok_or_else(|| Error::UnknownModelType {
            path: config.path.clone(),
            value: decoder_type.to_string(),
            supported: arch::supported(),
        })?;
        let tokenizer = Tokenizer::from_dir(dir)?;
        let weights = Weights::open(dir, dtype, device)?;
        let transformer = match &wrapped {
            Some((text, rename)) => {
                load(text, &weights.renamed(rename)).map_err(arch::in_text_config)?
            }
            None => load(&config, &weights)?,
        };
        let vocab = transformer.dims.vocab_size;
        if tokenizer.vocab_size() > vocab {
            return Err(Error::Tokenizer {
                path: tokenizer.path().to_path_buf(),
                message: format!(
                    "tokenizer has {} tokens but {} declares vocab_size {vocab}: tokenizer and model do not match",
                    tokenizer.vocab_size(),
                    config.path.display()
                ),
            });
        }
        let hook_points = transformer.hook_points();
        Ok(Self {
            dir: dir.to_path_buf(),
            model_type,
            // A multimodal wrapper may leave these to its language model's config.
            eos_token_ids: match config.eos_token_ids() {
                ids if ids.is_empty() => decoder.eos_token_ids(),
                ids => ids,
            },
            bos_token_id: config.bos_token_id().or(decoder.bos_token_id()),
            transformer,
            tokenizer,
            device: device.clone(),
            dtype,
            hook_points,
            content_hash: std::sync::OnceLock::new(),
        })
    }

    /// What identifies the model folder's content ([`crate::table::model_hash`]), computed
    /// once per loaded model. In-memory edits do not change it: it names the folder.
    pub fn content_hash(&self) -> Result<String> {
        if let Some(hash) = self.content_hash.get() {
            return Ok(hash.clone());
        }
        let hash = crate::table::model_hash(&self.dir)?;
        Ok(self.content_hash.get_or_init(|| hash).clone())
    }

    pub fn dims(&self) -> &Dims {
        &self.transformer.dims
    }

    /// Every hook point of this model, in forward order.
    pub fn hook_points(&self) -> &[HookPoint] {
        &self.hook_points
    }

    /// Resolves hook names or globs against this model's hooks.
    pub fn resolve_hooks(&self, patterns: &[&str]) -> Result<Vec<HookPoint>> {
        hooks::resolve_hook_patterns(patterns, &self.hook_points)
    }

    /// The token that starts a sequence: BOS, or EOS for models without one (GPT-2).
    pub fn start_token(&self) -> Option<u32> {
        self.bos_token_id.or(self.eos_token_ids.first().copied())
    }

    /// Every special token id: the tokenizer's, EOS and the start token.
    pub fn special_tokens(&self) -> HashSet<u32> {
        let mut special: HashSet<u32> = self.tokenizer.special_token_ids().into_iter().collect();
        special.extend(self.eos_token_ids.iter().copied());
        special.extend(self.start_token());
        special
    }

    /// Width of the value at `point`, measured with a one-token forward pass; errors name the
    /// point and list this model's hooks. A point that is not one vector per token (the
    /// attention pattern) has no width: SAEs and exports cannot read it.
    pub fn hook_width(&self, point: HookPoint) -> Result<usize> {
        if !point.per_token() {
            return Err(Error::InvalidArgument {
                what: "hook",
                value: point.to_string(),
                message: "is [batch, heads, query, key], not one vector per token; SAEs, \
                          features and exports read per-token hooks such as attn.hook_z"
                    .into(),
            });
        }
        let probe = self.forward(
            &self.ids_tensor(&[self.start_token().unwrap_or(0)])?,
            &Hooks::new().capture([point]),
        )?;
        probe
            .cache
            .get(point)
            .and_then(|t| t.dims().last().copied())
            .ok_or_else(|| Error::UnknownHook {
                name: point.to_string(),
                valid: self
                    .hook_points
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// A readable string for every token id of the vocabulary, indexed by id.
    pub fn token_names(&self) -> Vec<String> {
        (0..self.dims().vocab_size as u32)
            .map(|id| self.tokenizer.token_display(id))
            .collect()
    }

    /// Tokenises a prompt, rejecting empty prompts and prompts longer than the context.
    pub fn encode_prompt(&self, prompt: &str) -> Result<Vec<u32>> {
        if prompt.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        let ids = self.tokenizer.encode(prompt)?;
        if ids.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        self.check_length(ids.len())?;
        Ok(ids)
    }

    /// Refuses a sequence of `tokens` longer than the context window.
    pub fn check_length(&self, tokens: usize) -> Result<()> {
        let max = self.dims().context_length;
        if tokens > max {
            return Err(Error::PromptTooLong { tokens, max });
        }
        Ok(())
    }

    /// `[1, seq]` u32 tensor on the model's device.
    pub fn ids_tensor(&self, ids: &[u32]) -> Result<Tensor> {
        Ok(Tensor::new(ids, &self.device)?.unsqueeze(0)?)
    }

    /// A forward pass over `input_ids` (`[batch, seq]`, u32) with hooks.
    pub fn forward(&self, input_ids: &Tensor, hooks: &Hooks) -> Result<ForwardOutput> {
        self.forward_impl(input_ids, None, hooks)
    }

    /// A forward pass that continues `kv` (incremental decoding).
    pub fn forward_cached(
        &self,
        input_ids: &Tensor,
        kv: &mut KvCache,
        hooks: &Hooks,
    ) -> Result<ForwardOutput> {
        self.forward_impl(input_ids, Some(kv), hooks)
    }

    /// Runs the model and returns logits plus the values at `patterns` (names or globs),
    /// like TransformerLens' `run_with_cache(names_filter=...)`.
    pub fn run_with_cache(&self, input_ids: &Tensor, patterns: &[&str]) -> Result<ForwardOutput> {
        let points = self.resolve_hooks(patterns)?;
        self.forward(input_ids, &Hooks::new().capture(points))
    }

    fn forward_impl(
        &self,
        input_ids: &Tensor,
        kv: Option<&mut KvCache>,
        hooks: &Hooks,
    ) -> Result<ForwardOutput> {
        if let Some(bad) = hooks.points().find(|p| !self.hook_points.contains(p)) {
            return Err(Error::UnknownHook {
                name: bad.to_string(),
                valid: self
                    .hook_points
                    .iter()
                    .map(|h| h.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let offset = kv.as_ref().map_or(0, |kv| kv.len());
        let (_, seq) = input_ids.dims2()?;
        self.check_length(offset + seq)?;
        if let Some(bad) = input_ids
            .flatten_all()?
            .to_dtype(DType::U32)?
            .to_vec1::<u32>()?
            .into_iter()
            .find(|&id| id as usize >= self.dims().vocab_size)
        {
            return Err(Error::InvalidArgument {
                what: "token id",
                value: bad.to_string(),
                message: format!(
                    "outside the vocabulary of {} tokens",
                    self.dims().vocab_size
                ),
            });
        }
        let mut runner = HookRunner::new(hooks, offset);
        let logits = self.transformer.forward(input_ids, kv, &mut runner)?;
        Ok(ForwardOutput {
            logits,
            cache: runner.cache,
            grad_leaves: runner.grad_leaves,
        })
    }
}
