//! The options several commands share.
use clap::Args;

/// Options shared by every command that loads a model.
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// An HF model folder (config.json, *.safetensors, tokenizer.json) or a .gguf file.
    #[arg(long)]
    pub model: std::path::PathBuf,
    /// Weights dtype: f32 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// A LoRA adapter folder in PEFT's layout to apply on top of the model.
    #[arg(long)]
    pub adapter: Option<std::path::PathBuf>,
    /// Keep the linear weights quantised in memory: a .gguf file's blocks as stored (an HF
    /// folder's quantised to Q8_0). Decoding then multiplies them as llama.cpp does, with
    /// int8-quantised activations (docs/qlora.md).
    #[arg(long)]
    pub keep_quantized: bool,
}

/// How a prompt is turned into tokens.
#[derive(Args, Clone, Debug)]
pub struct PromptArgs {
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as a user message in the model's chat template (with the generation prompt).
    #[arg(long)]
    pub chat: bool,
    /// A system message, with --chat.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
}

/// Sampling settings (TRL / transformers names).
#[derive(Args, Clone, Debug)]
pub struct SamplingArgs {
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 0)]
    pub min_new_tokens: usize,
    /// 0 means greedy.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// 0 disables top-k.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// At most this many sequences decode at once (vLLM's name); the other prompts join the
    /// running batch as sequences finish. Bounds the KV cache's memory; 0: every prompt at once.
    #[arg(long, default_value_t = 0)]
    pub max_num_seqs: usize,
    /// Multiply in bf16 over the f32 weights (bf16 operands, f32 sums), as `bf16 = true` does in
    /// training and the pipeline: its evaluations' products, and faster sampling where the CPU
    /// multiplies in bf16 (AMX, AVX-512 BF16). Reward models the command runs multiply the same
    /// way. Not with `--dtype bf16`, whose products are all bf16 already.
    #[arg(long)]
    pub bf16: bool,
}

/// How every trainer is started.
#[derive(Args, Clone, Debug)]
pub struct RunArgs {
    /// TOML file with TRL's parameter names (see examples/).
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// Override a config key: `--set learning_rate=1e-4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Continue from the newest checkpoint in output_dir.
    #[arg(long)]
    pub resume: bool,
    /// Only evaluate on eval_file and print the metrics.
    #[arg(long)]
    pub eval_only: bool,
}

/// What a pairwise judge (`llm:PATH`, `openai:URL#MODEL`) is asked.
#[derive(Args, Clone, Debug)]
pub struct JudgeAsk {
    /// The judge's question (default: "Which response is better?").
    #[arg(long)]
    pub question: Option<String>,
    /// A Jinja template for the judge's message (a rubric) with `prompt`, `response_a`,
    /// `response_b` and `question`; the judge answers A or B (docs/labelling.md).
    #[arg(long)]
    pub rubric: Option<std::path::PathBuf>,
}

impl JudgeAsk {
    /// The judge `spec` asked this way.
    pub fn judge(&self, spec: &str) -> anyhow::Result<preftune_eval::judge::Judge> {
        let ask = preftune_eval::judge::PairwisePrompt::new(
            self.question.as_deref(),
            self.rubric.as_deref(),
        )?;
        Ok(preftune_eval::judge::Judge::parse_with(spec, ask)?)
    }
}
