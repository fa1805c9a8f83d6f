//! A model, its tokenizer and generation settings, loaded from an HF folder or a `.gguf` file and
//! saved as an HF folder that `transformers` loads unchanged.
use std::path::Path;

use candle_core::{DType, Device};
use serde_json::{json, Value};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::gguf::load_gguf_with;
use crate::io::{read_json, write_json};
use crate::model::{Model, QuantizedBase};
use crate::ops::BaseQuant;
use crate::tokenizer::Tokenizer;
use crate::weights::{load_hf_weights_as, save_safetensors};

pub struct Pretrained {
    pub model: Model,
    pub tokenizer: Tokenizer,
    /// generation_config.json as read (or built from the model config).
    pub generation_config: Value,
}

#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub dtype: DType,
    /// Make every parameter a `Var` (full fine-tuning); off for inference and frozen models.
    pub trainable: bool,
    /// Default: the process's device ([`crate::device::set_process_device`], the binary's
    /// `--device`), else the CPU.
    pub device: Device,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: DType::F32,
            trainable: false,
            device: crate::device::default_device(),
        }
    }
}

/// Parses `f32`/`float32`, `bf16`/`bfloat16`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => Err(Error::Msg(format!(
            "unsupported dtype {other:?} (use f32 or bf16)"
        ))),
    }
}

fn torch_dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

fn generation_config_from(cfg: &ModelConfig, tok: &Tokenizer) -> Value {
    let eos: Vec<u32> = if cfg.eos_token_ids.is_empty() {
        tok.eos_token_id.into_iter().collect()
    } else {
        cfg.eos_token_ids.clone()
    };
    json!({
        "bos_token_id": cfg.bos_token_id.or(tok.bos_token_id),
        "eos_token_id": if eos.len() == 1 { json!(eos[0]) } else { json!(eos) },
        "pad_token_id": cfg.pad_token_id.or(tok.pad_token_id),
    })
}

impl Pretrained {
    /// The number of parameters (a tied LM head counted once).
    pub fn num_parameters(&self) -> usize {
        self.model
            .named_params()
            .iter()
            .map(|(_, t)| t.elem_count())
            .sum()
    }

    /// Loads `path`: a folder with config.json, safetensors and tokenizer files, or a `.gguf` file.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Self> {
        Self::load_with(path, opts, None)
    }

    /// [`Pretrained::load`] with the linear weights kept quantised, for LoRA on a quantised base:
    /// a GGUF file's quantised blocks stay as stored, and dense weights (an HF folder, a GGUF
    /// file's f16/f32 tensors) are quantised to `quant`. Embeddings, norms and the LM head stay
    /// dense. The model is frozen and on the CPU.
    pub fn load_quantized(path: &Path, opts: &LoadOptions, quant: BaseQuant) -> Result<Self> {
        Self::load_with(path, opts, Some(quant))
    }

    fn load_with(path: &Path, opts: &LoadOptions, quant: Option<BaseQuant>) -> Result<Self> {
        if !path.exists() {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "model path does not exist"),
            ));
        }
        if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
            let g = load_gguf_with(path, &opts.device, quant.is_some())?;
            let cfg = ModelConfig::from_json(g.config, path)?;
            let generation_config = generation_config_from(&cfg, &g.tokenizer);
            let base = QuantizedBase {
                quantized: g.quantized,
                quantize: quant,
            };
            let model = Model::from_parts(cfg, g.tensors, base, path, opts.dtype, opts.trainable)?;
            return Ok(Pretrained {
                model,
                tokenizer: g.tokenizer,
                generation_config,
            });
        }
        if !path.is_dir() {
            return Err(Error::invalid(
                path,
                "model",
                "expected an HF model folder or a .gguf file",
            ));
        }
        if !path.join("config.json").exists() && path.join("adapter_config.json").exists() {
            if quant.is_some() {
                return Err(Error::invalid(
                    path,
                    "model",
                    "an adapter folder does not load on a quantised base; name its base model",
                ));
            }
            return Self::load_adapter_folder(path, opts);
        }
        let cfg = ModelConfig::from_file(&path.join("config.json"))?;
        let tokenizer = Tokenizer::from_hf_dir(path)?;
        let gc = path.join("generation_config.json");
        let generation_config = if gc.exists() {
            read_json(&gc)?
        } else {
            generation_config_from(&cfg, &tokenizer)
        };
        let tensors = load_hf_weights_as(
            path,
            cfg.arch,
            &opts.device,
            opts.trainable.then_some(opts.dtype),
        )?;
        let base = QuantizedBase {
            quantized: Default::default(),
            quantize: quant,
        };
        let model = Model::from_parts(cfg, tensors, base, path, opts.dtype, opts.trainable)?;
        Ok(Pretrained {
            model,
            tokenizer,
            generation_config,
        })
    }

    /// A PEFT adapter folder, as `AutoPeftModelForCausalLM` loads it: the base model named by
    /// `base_model_name_or_path`, with the adapters on top (frozen: adapters train through
    /// `use_peft`, which resumes from such a folder).
    fn load_adapter_folder(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let cp = dir.join("adapter_config.json");
        if opts.trainable {
            return Err(Error::invalid(
                &cp,
                "base_model_name_or_path",
                "an adapter folder loads frozen; train adapters with use_peft",
            ));
        }
        let v = read_json(&cp)?;
        let base = v
            .get("base_model_name_or_path")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::invalid(&cp, "base_model_name_or_path", "missing"))?;
        let mut p = Self::load(Path::new(base), opts)?;
        p.model.load_lora(dir, false)?;
        Ok(p)
    }

    /// EOS ids for generation: generation_config.json first, then config.json, then the tokenizer.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        let from_gc = crate::config::token_ids(self.generation_config.get("eos_token_id"));
        if !from_gc.is_empty() {
            return from_gc;
        }
        if !self.model.cfg.eos_token_ids.is_empty() {
            return self.model.cfg.eos_token_ids.clone();
        }
        self.tokenizer.eos_token_id.into_iter().collect()
    }

    /// Padding id: the tokenizer's pad token, else the model config's, else the first EOS, else 0.
    pub fn pad_token_id(&self) -> u32 {
        self.tokenizer
            .pad_token_id
            .or(self.model.cfg.pad_token_id)
            .or(self.eos_token_ids().first().copied())
            .unwrap_or(0)
    }

    /// Writes config.json, model.safetensors, tokenizer.json, tokenizer_config.json and
    /// generation_config.json into `dir` (created if needed), each file atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        if self.model.is_quantized() {
            return Err(Error::invalid(
                dir,
                "model",
                "a quantised base is not saved: save its LoRA adapter, then `preftune merge` it \
                 into the full-precision base",
            ));
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut config = self.model.cfg.raw.clone();
        if self.model.has_score_head() {
            // transformers' AutoModelForSequenceClassification with one label; it finds the last
            // real token through pad_token_id.
            let arch = config["architectures"][0]
                .as_str()
                .unwrap_or("LlamaForCausalLM")
                .replace("LMHeadModel", "ForSequenceClassification")
                .replace("ForCausalLM", "ForSequenceClassification");
            config["architectures"] = json!([arch]);
            config["id2label"] = json!({"0": "LABEL_0"});
            config["label2id"] = json!({"LABEL_0": 0});
            config["pad_token_id"] = json!(self.pad_token_id());
        }
        let dtype = torch_dtype_name(self.model.dtype());
        config["torch_dtype"] = json!(dtype);
        if config.get("dtype").is_some() {
            config["dtype"] = json!(dtype);
        }
        write_json(&dir.join("config.json"), &config)?;
        save_safetensors(
            &dir.join("model.safetensors"),
            self.model.cfg.arch,
            &self.model.named_params(),
        )?;
        self.tokenizer.save(dir)?;
        write_json(&dir.join("generation_config.json"), &self.generation_config)
    }
}
