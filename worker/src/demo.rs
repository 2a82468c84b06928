//! `herd demo`: a complete fine-tuning job with no download — a tiny random LLaMA, a LLaMA-like
//! tokenizer built in code, and instruction data from simple task families whose answers can be
//! checked exactly, so a few minutes of CPU training visibly improve exact-match accuracy.
//!
//! Layout written by [`write_demo_assets`]:
//! - `DIR/model/`: config.json, model.safetensors (f32, random from the seed), tokenizer.json,
//!   tokenizer_config.json, special_tokens_map.json (no pad token: the train.py `[PAD]` path runs).
//! - `DIR/data/train.json`, `DIR/data/eval.json`: Alpaca JSON arrays; every record also has a
//!   `"task"` key (ignored by training, used by [`exact_match_by_task`]). Train and eval are
//!   disjoint in (instruction, input).
//! - `DIR/data/conversations.json`: ShareGPT records (Vicuna format), each a chat of 2–3 tasks from
//!   the same families (`"tasks"` lists them), for conversation training (`configs/demo-chat.yaml`).
//! - `DIR/data/comparisons.json`: `{user_input, completion_a, completion_b, task}` pairs, a the
//!   correct answer and b a wrong one of the same family, for reward-model training, and
//!   `DIR/data/eval_comparisons.json`: held-out pairs whose prompts are not in the training pairs.
//!
//! All of it is a pure function of the seed.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use candle_core::DType;
use herd_model::init::SplitMix64;
use herd_model::{Llama, LlamaConfig, Tokenizer};
use serde::{Deserialize, Serialize};

use crate::data::chat::{VICUNA_ASSISTANT, VICUNA_SYSTEM, VICUNA_USER};
use crate::data::{AlpacaRecord, DataError, PROMPT_INPUT, PROMPT_NO_INPUT};
use crate::error::{Error, Result};

pub const DEMO_TRAIN_RECORDS: usize = 4000;
pub const DEMO_EVAL_RECORDS: usize = 200;
pub const DEMO_CHAT_RECORDS: usize = 1000;
pub const DEMO_COMPARISONS: usize = 600;
pub const DEMO_EVAL_COMPARISONS: usize = 140;
/// The demo tokenizer's model_max_length; every demo example is far shorter.
pub const DEMO_MAX_LEN: usize = 128;

/// The task families, in generation order.
pub const TASKS: [&str; 7] = [
    "repeat",
    "first_word",
    "count_words",
    "add",
    "reverse_words",
    "sort_words",
    "uppercase",
];

/// Short common words the tasks draw from (lowercase, distinct, ASCII).
pub const WORDS: [&str; 40] = [
    "cat", "dog", "sun", "tree", "fish", "bird", "star", "moon", "rain", "snow", "book", "door",
    "lamp", "milk", "rose", "ship", "road", "hill", "lake", "wind", "fire", "gold", "ring", "cake",
    "bell", "frog", "goat", "kite", "leaf", "nest", "owl", "pear", "apple", "bread", "cloud",
    "river", "stone", "train", "tiger", "zebra",
];

const INSTR_REPEAT: &str = "Repeat the words.";
const INSTR_FIRST: &str = "What is the first word?";
const INSTR_COUNT: &str = "How many words are there?";
const INSTR_REVERSE: &str = "Reverse the order of the words.";
const INSTR_SORT: &str = "Sort the words in alphabetical order.";
const INSTR_UPPER: &str = "Write the words in capital letters.";

/// One demo record: an Alpaca record plus its task family.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DemoRecord {
    pub task: String,
    pub instruction: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    pub output: String,
}

impl DemoRecord {
    pub fn alpaca(&self) -> AlpacaRecord {
        AlpacaRecord {
            instruction: self.instruction.clone(),
            input: self.input.clone(),
            output: self.output.clone(),
        }
    }
}

/// What [`write_demo_assets`] wrote.
#[derive(Debug, Clone)]
pub struct DemoSummary {
    pub dir: PathBuf,
    pub model_dir: PathBuf,
    pub train_path: PathBuf,
    pub eval_path: PathBuf,
    pub conversations_path: PathBuf,
    pub comparisons_path: PathBuf,
    pub eval_comparisons_path: PathBuf,
    pub train_records: usize,
    pub eval_records: usize,
    pub conversations: usize,
    pub comparisons: usize,
    pub eval_comparisons: usize,
    /// `len(tokenizer)` before the `[PAD]` addition (= config.json vocab_size).
    pub vocab_size: usize,
    pub num_parameters: usize,
    pub tasks: Vec<String>,
}

/// Every word the demo tokenizer keeps whole: template words, instruction words, the word list and
/// its uppercase forms.
pub fn demo_vocab_words() -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut seen = HashSet::new();
    let mut add = |w: &str| {
        if seen.insert(w.to_string()) {
            out.push(w.to_string());
        }
    };
    for text in [
        PROMPT_INPUT,
        PROMPT_NO_INPUT,
        INSTR_REPEAT,
        INSTR_FIRST,
        INSTR_COUNT,
        INSTR_REVERSE,
        INSTR_SORT,
        INSTR_UPPER,
        "What is",
    ] {
        for w in text.split_whitespace() {
            if !w.contains('{') {
                add(w);
            }
        }
    }
    for w in WORDS {
        add(w);
    }
    for w in WORDS {
        add(&w.to_uppercase());
    }
    // The Vicuna template's words, appended last so the ids above stay put.
    for w in VICUNA_SYSTEM.split_whitespace() {
        add(w);
    }
    add(&format!("{VICUNA_USER}:"));
    add(&format!("{VICUNA_ASSISTANT}:"));
    out
}

/// The demo tokenizer (no pad token; `model_max_length` = [`DEMO_MAX_LEN`]).
pub fn demo_tokenizer() -> herd_model::Result<Tokenizer> {
    let words = demo_vocab_words();
    let refs: Vec<&str> = words.iter().map(String::as_str).collect();
    let mut tok = Tokenizer::demo(&refs)?;
    tok.set_model_max_length(Some(DEMO_MAX_LEN));
    Ok(tok)
}

/// The tiny LLaMA config for a vocabulary of `vocab_size`.
pub fn demo_config(vocab_size: usize) -> herd_model::Result<LlamaConfig> {
    let v = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "intermediate_size": 352,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        // Wider than HF's 0.02: at hidden 128 attention logits start non-trivial. Measured on the
        // demo job (1 epoch): last logged loss 2.19 with 0.06 against 2.49 with 0.02.
        "initializer_range": 0.06,
        "tie_word_embeddings": false,
        "attention_bias": false,
        "mlp_bias": false,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    });
    serde_json::from_value(v).map_err(|e| herd_model::Error::Config(e.to_string()))
}

fn pick<'a>(rng: &mut SplitMix64, items: &[&'a str]) -> &'a str {
    items[(rng.next_u64() % items.len() as u64) as usize]
}

/// 1..=max distinct words in random order.
fn words(rng: &mut SplitMix64, min: usize, max: usize) -> Vec<&'static str> {
    let n = min + (rng.next_u64() % (max - min + 1) as u64) as usize;
    let mut out: Vec<&'static str> = Vec::with_capacity(n);
    while out.len() < n {
        let w = pick(rng, &WORDS);
        if !out.contains(&w) {
            out.push(w);
        }
    }
    out
}

/// One record of family `task`.
pub fn make_record(task: &str, rng: &mut SplitMix64) -> DemoRecord {
    let rec = |instruction: &str, input: Option<String>, output: String| DemoRecord {
        task: task.to_string(),
        instruction: instruction.to_string(),
        input,
        output,
    };
    match task {
        "repeat" => {
            let w = words(rng, 1, 3).join(" ");
            rec(INSTR_REPEAT, Some(w.clone()), w)
        }
        "first_word" => {
            let w = words(rng, 2, 4);
            rec(INSTR_FIRST, Some(w.join(" ")), w[0].to_string())
        }
        "count_words" => {
            let w = words(rng, 1, 5);
            rec(INSTR_COUNT, Some(w.join(" ")), w.len().to_string())
        }
        "add" => {
            let a = rng.next_u64() % 20;
            let b = rng.next_u64() % 20;
            rec(&format!("What is {a} + {b}?"), None, (a + b).to_string())
        }
        "reverse_words" => {
            let w = words(rng, 2, 4);
            let r: Vec<&str> = w.iter().rev().copied().collect();
            rec(INSTR_REVERSE, Some(w.join(" ")), r.join(" "))
        }
        "sort_words" => {
            let w = words(rng, 2, 4);
            let mut s = w.clone();
            s.sort_unstable();
            rec(INSTR_SORT, Some(w.join(" ")), s.join(" "))
        }
        "uppercase" => {
            let w = words(rng, 1, 3).join(" ");
            rec(INSTR_UPPER, Some(w.clone()), w.to_uppercase())
        }
        other => panic!("unknown demo task {other:?}"),
    }
}

/// `n_train` + `n_eval` records, families in rotation, eval generated first and train disjoint
/// from it in (instruction, input). A pure function of the arguments.
pub fn generate_records(
    seed: u64,
    n_train: usize,
    n_eval: usize,
) -> (Vec<DemoRecord>, Vec<DemoRecord>) {
    let mut rng = SplitMix64::new(seed ^ 0x6865_7264_6465_6d6f); // "herddemo"
    let mut seen: HashSet<(String, Option<String>)> = HashSet::new();
    let mut gen = |n: usize, unique: bool, seen: &mut HashSet<(String, Option<String>)>| {
        let mut out = Vec::with_capacity(n);
        let mut i = 0usize;
        let mut attempts = 0usize;
        while out.len() < n {
            let task = TASKS[i % TASKS.len()];
            let r = make_record(task, &mut rng);
            attempts += 1;
            let key = (r.instruction.clone(), r.input.clone());
            // Eval records are unique among themselves; train only avoids eval's keys (the small
            // families cannot provide thousands of distinct prompts, and repeats are fine there).
            let fresh = if unique {
                seen.insert(key)
            } else {
                !seen.contains(&key)
            };
            if fresh || attempts > 1000 * (n + 1) {
                out.push(r);
                i += 1;
            }
        }
        out
    };
    let eval = gen(n_eval, true, &mut seen);
    let train = gen(n_train, false, &mut seen);
    (train, eval)
}

/// One demo conversation in ShareGPT form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DemoConversation {
    pub id: String,
    pub tasks: Vec<String>,
    pub conversations: Vec<DemoTurn>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DemoTurn {
    pub from: String,
    pub value: String,
}

/// One comparison pair (GPT-4-LLM's comparison-data keys): a is right, b is wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DemoComparison {
    pub task: String,
    pub user_input: String,
    pub completion_a: String,
    pub completion_b: String,
}

/// The user's message for a record: the instruction, then the input on its own line.
pub fn user_text(r: &DemoRecord) -> String {
    match &r.input {
        Some(i) if !i.is_empty() => format!("{}\n{i}", r.instruction),
        _ => r.instruction.clone(),
    }
}

/// `n` conversations of 2–3 tasks each (distinct families within a conversation).
pub fn generate_conversations(seed: u64, n: usize) -> Vec<DemoConversation> {
    let mut rng = SplitMix64::new(seed ^ 0x6865_7264_6368_6174); // "herdchat"
    (0..n)
        .map(|i| {
            let turns = 2 + (rng.next_u64() % 2) as usize;
            let mut tasks: Vec<&str> = Vec::new();
            while tasks.len() < turns {
                let t = pick(&mut rng, &TASKS);
                if !tasks.contains(&t) {
                    tasks.push(t);
                }
            }
            let mut conversations = Vec::new();
            for t in &tasks {
                let r = make_record(t, &mut rng);
                conversations.push(DemoTurn {
                    from: "human".into(),
                    value: user_text(&r),
                });
                conversations.push(DemoTurn {
                    from: "gpt".into(),
                    value: r.output,
                });
            }
            DemoConversation {
                id: format!("demo-chat-{i}"),
                tasks: tasks.iter().map(|t| t.to_string()).collect(),
                conversations,
            }
        })
        .collect()
}

/// `n` comparison pairs, families in rotation; b is the answer to another prompt of the same
/// family that differs from a.
pub fn generate_comparisons(seed: u64, n: usize) -> Vec<DemoComparison> {
    comparisons_from(SplitMix64::new(seed ^ 0x6865_7264_7061_6972), n) // "herdpair"
}

/// `n` held-out pairs from their own stream, none with a prompt of `train`.
pub fn generate_eval_comparisons(
    seed: u64,
    n: usize,
    train: &[DemoComparison],
) -> Vec<DemoComparison> {
    let seen: HashSet<&str> = train.iter().map(|c| c.user_input.as_str()).collect();
    let mut rng = SplitMix64::new(seed ^ 0x6865_7264_6576_616c); // "herdeval"
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        // One rotation of the families at a time keeps them balanced.
        for c in comparisons_from(SplitMix64::new(rng.next_u64()), TASKS.len()) {
            if out.len() < n && !seen.contains(c.user_input.as_str()) {
                out.push(c);
            }
        }
    }
    out
}

fn comparisons_from(mut rng: SplitMix64, n: usize) -> Vec<DemoComparison> {
    (0..n)
        .map(|i| {
            let task = TASKS[i % TASKS.len()];
            let r = make_record(task, &mut rng);
            let mut wrong = String::new();
            for _ in 0..64 {
                let o = make_record(task, &mut rng).output;
                if o != r.output {
                    wrong = o;
                    break;
                }
            }
            if wrong.is_empty() {
                wrong = format!("{} {}", r.output, WORDS[0]);
            }
            DemoComparison {
                task: task.to_string(),
                user_input: user_text(&r),
                completion_a: r.output,
                completion_b: wrong,
            }
        })
        .collect()
}

fn write_json<T: Serialize>(path: &Path, records: &[T]) -> Result<()> {
    let mut text = serde_json::to_string_pretty(records).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    })?;
    text.push('\n');
    herd_model::weights::write_atomic(path, text.as_bytes())?;
    Ok(())
}

/// Write the demo model, tokenizer and data under `dir` (see the module docs).
pub fn write_demo_assets(dir: &Path, seed: u64) -> Result<DemoSummary> {
    let model_dir = dir.join("model");
    let data_dir = dir.join("data");
    for d in [&model_dir, &data_dir] {
        std::fs::create_dir_all(d).map_err(|source| Error::Io {
            path: d.to_path_buf(),
            source,
        })?;
    }
    let tok = demo_tokenizer()?;
    let cfg = demo_config(tok.len())?;
    let model = Llama::random(cfg, seed)?;
    model.save(&model_dir, DType::F32)?;
    tok.save(&model_dir)?;

    let (train, eval) = generate_records(seed, DEMO_TRAIN_RECORDS, DEMO_EVAL_RECORDS);
    let train_path = data_dir.join("train.json");
    let eval_path = data_dir.join("eval.json");
    write_json(&train_path, &train)?;
    write_json(&eval_path, &eval)?;
    let conversations = generate_conversations(seed, DEMO_CHAT_RECORDS);
    let comparisons = generate_comparisons(seed, DEMO_COMPARISONS);
    let conversations_path = data_dir.join("conversations.json");
    let comparisons_path = data_dir.join("comparisons.json");
    let eval_comparisons = generate_eval_comparisons(seed, DEMO_EVAL_COMPARISONS, &comparisons);
    let eval_comparisons_path = data_dir.join("eval_comparisons.json");
    write_json(&conversations_path, &conversations)?;
    write_json(&comparisons_path, &comparisons)?;
    write_json(&eval_comparisons_path, &eval_comparisons)?;
    Ok(DemoSummary {
        dir: dir.to_path_buf(),
        model_dir,
        train_path,
        eval_path,
        conversations_path,
        comparisons_path,
        eval_comparisons_path,
        train_records: train.len(),
        eval_records: eval.len(),
        conversations: conversations.len(),
        comparisons: comparisons.len(),
        eval_comparisons: eval_comparisons.len(),
        vocab_size: tok.len(),
        num_parameters: model.num_parameters(),
        tasks: TASKS.iter().map(|s| s.to_string()).collect(),
    })
}

/// Read a demo data file (records with their `"task"`).
pub fn load_demo_records(path: &Path) -> Result<Vec<DemoRecord>> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| {
        Error::Data(DataError::Syntax {
            path: path.to_path_buf(),
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        })
    })
}

/// Exact match (trimmed string equality) per task: task → (correct, total). Records and
/// predictions are paired in order; extra entries of the longer list are ignored.
pub fn exact_match_by_task<S: AsRef<str>>(
    records: &[DemoRecord],
    predictions: &[S],
) -> BTreeMap<String, (usize, usize)> {
    let mut out: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (r, p) in records.iter().zip(predictions) {
        let e = out.entry(r.task.clone()).or_default();
        e.1 += 1;
        if p.as_ref().trim() == r.output.trim() {
            e.0 += 1;
        }
    }
    out
}

/// The distinct tasks of some records, sorted.
pub fn tasks_of(records: &[DemoRecord]) -> BTreeSet<String> {
    records.iter().map(|r| r.task.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{encode_alpaca, load_records};

    #[test]
    fn records_are_correct_and_deterministic() {
        let (train, eval) = generate_records(5, 700, 70);
        assert_eq!((train.len(), eval.len()), (700, 70));
        assert_eq!(generate_records(5, 700, 70), (train.clone(), eval.clone()));
        assert_ne!(generate_records(6, 700, 70).0, train);
        let keys: HashSet<_> = eval.iter().map(|r| (&r.instruction, &r.input)).collect();
        assert_eq!(keys.len(), eval.len());
        assert!(train
            .iter()
            .all(|r| !keys.contains(&(&r.instruction, &r.input))));
        for r in train.iter().chain(&eval) {
            let input = r.input.clone().unwrap_or_default();
            let ws: Vec<&str> = input.split(' ').collect();
            let ok = match r.task.as_str() {
                "repeat" => r.output == input,
                "first_word" => r.output == ws[0],
                "count_words" => r.output == ws.len().to_string(),
                "add" => {
                    let nums: Vec<u64> = r
                        .instruction
                        .trim_start_matches("What is ")
                        .trim_end_matches('?')
                        .split(" + ")
                        .map(|s| s.parse().unwrap())
                        .collect();
                    r.output == (nums[0] + nums[1]).to_string() && r.input.is_none()
                }
                "reverse_words" => {
                    r.output == ws.iter().rev().copied().collect::<Vec<_>>().join(" ")
                }
                "sort_words" => {
                    let mut s = ws.clone();
                    s.sort();
                    r.output == s.join(" ")
                }
                "uppercase" => r.output == input.to_uppercase(),
                _ => false,
            };
            assert!(ok, "{r:?}");
        }
        assert_eq!(tasks_of(&train).len(), TASKS.len());
    }

    #[test]
    fn demo_tokenizer_keeps_words_whole_and_fits() {
        let mut tok = demo_tokenizer().unwrap();
        assert_eq!(tok.pad_id(), None);
        assert_eq!(tok.add_missing_special_tokens(), 1);
        for w in WORDS {
            assert_eq!(tok.encode(w).unwrap().len(), 2, "{w}");
            assert_eq!(tok.encode(&w.to_uppercase()).unwrap().len(), 2, "{w}");
        }
        let (train, eval) = generate_records(1, 300, 30);
        let mut longest = 0;
        for r in train.iter().chain(&eval) {
            let ex = encode_alpaca(&tok, &r.alpaca(), 100_000).unwrap();
            longest = longest.max(ex.len());
            assert_eq!(tok.decode(&ex.input_ids, true).unwrap(), {
                let a = r.alpaca();
                format!("{}{}", crate::data::source_text(&a), a.output)
            });
        }
        assert!(
            longest < DEMO_MAX_LEN,
            "longest demo example has {longest} tokens"
        );
    }

    #[test]
    fn conversations_and_comparisons() {
        use crate::data::{encode_record, load_file, Record};
        let c = generate_conversations(3, 200);
        assert_eq!(c, generate_conversations(3, 200));
        assert_ne!(c, generate_conversations(4, 200));
        let p = generate_comparisons(3, 70);
        assert_eq!(p, generate_comparisons(3, 70));
        for x in &p {
            assert_ne!(x.completion_a, x.completion_b);
        }
        let held = generate_eval_comparisons(3, 30, &p);
        assert_eq!(held.len(), 30);
        assert_eq!(held, generate_eval_comparisons(3, 30, &p));
        let train_prompts: HashSet<_> = p.iter().map(|x| &x.user_input).collect();
        assert!(held.iter().all(|x| !train_prompts.contains(&x.user_input)));
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("c.json");
        write_json(&path, &c).unwrap();
        let l = load_file(&path, herd_proto::DataFormat::Auto, false).unwrap();
        assert_eq!(l.format, herd_proto::DataFormat::Sharegpt);
        assert_eq!(l.records.len(), 200);
        let mut tok = demo_tokenizer().unwrap();
        tok.add_missing_special_tokens();
        for (r, dc) in l.records.iter().zip(&c) {
            let Record::Chat(conv) = r else { panic!() };
            assert!(dc.tasks.len() == 2 || dc.tasks.len() == 3);
            assert_eq!(conv.messages.len(), 2 * dc.tasks.len());
            let ex = encode_record(&tok, r, 100_000).unwrap();
            assert!(
                ex.len() < DEMO_MAX_LEN,
                "conversation of {} tokens",
                ex.len()
            );
            // Template words stay whole: no byte or single-character pieces for the system prompt.
            assert!(ex.len() < 110);
            // Trained tokens decode to the answers, each followed by </s>.
            let trained: Vec<u32> = ex
                .input_ids
                .iter()
                .zip(&ex.labels)
                .filter(|(_, &l)| l >= 0)
                .map(|(&i, _)| i)
                .collect();
            let answers: String = dc
                .conversations
                .iter()
                .filter(|t| t.from == "gpt")
                .map(|t| format!(" {}</s>", t.value))
                .collect();
            assert_eq!(tok.decode(&trained, false).unwrap(), answers.trim_start());
        }
    }

    #[test]
    fn exact_match() {
        let (_, eval) = generate_records(3, 0, 14);
        let mut preds: Vec<String> = eval.iter().map(|r| format!(" {}\n", r.output)).collect();
        preds[0] = "wrong".into();
        let m = exact_match_by_task(&eval, &preds);
        assert_eq!(m.len(), TASKS.len());
        assert_eq!(m[TASKS[0]], (1, 2));
        assert_eq!(m[TASKS[1]], (2, 2));
        assert_eq!(m.values().map(|v| v.1).sum::<usize>(), 14);
    }

    #[test]
    fn writes_assets() {
        let d = tempfile::tempdir().unwrap();
        let s = write_demo_assets(d.path(), 7).unwrap();
        assert_eq!(s.train_records, DEMO_TRAIN_RECORDS);
        assert_eq!(s.eval_records, DEMO_EVAL_RECORDS);
        assert_eq!(
            (s.conversations, s.comparisons),
            (DEMO_CHAT_RECORDS, DEMO_COMPARISONS)
        );
        assert!(s.conversations_path.is_file() && s.comparisons_path.is_file());
        for f in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ] {
            assert!(s.model_dir.join(f).exists(), "{f}");
        }
        let tok = Tokenizer::from_dir(&s.model_dir).unwrap();
        assert_eq!(tok.len(), s.vocab_size);
        assert_eq!(tok.pad_id(), None);
        assert_eq!(tok.model_max_length(), Some(DEMO_MAX_LEN));
        let model = Llama::load(&s.model_dir).unwrap();
        assert_eq!(model.config().vocab_size, s.vocab_size);
        assert_eq!(model.num_parameters(), s.num_parameters);
        let l = load_records(&s.train_path, false).unwrap();
        assert_eq!(l.records.len(), DEMO_TRAIN_RECORDS);
        let e = load_demo_records(&s.eval_path).unwrap();
        assert_eq!(e.len(), DEMO_EVAL_RECORDS);
        assert_eq!(
            e,
            generate_records(7, DEMO_TRAIN_RECORDS, DEMO_EVAL_RECORDS).1
        );
    }
}
