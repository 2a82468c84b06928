//! The Alpaca prompt templates of train.py, byte for byte, and the source/target texts.
//!
//! train.py: `prompt_input.format_map(example) if example.get("input", "") != "" else
//! prompt_no_input.format_map(example)`; target = `f"{output}{tokenizer.eos_token}"`.

use super::records::AlpacaRecord;

pub const PROMPT_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:";

pub const PROMPT_NO_INPUT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:";

/// Python's `str.format_map` for our two placeholders: the template is scanned once, so braces in
/// the substituted values are never reinterpreted.
fn fill(template: &str, instruction: &str, input: &str) -> String {
    let mut out = String::with_capacity(template.len() + instruction.len() + input.len());
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(t) = tail.strip_prefix("{instruction}") {
            out.push_str(instruction);
            rest = t;
        } else if let Some(t) = tail.strip_prefix("{input}") {
            out.push_str(input);
            rest = t;
        } else {
            out.push('{');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// True when the with-input template applies (input present and not "").
pub fn has_input(rec: &AlpacaRecord) -> bool {
    rec.input.as_deref().is_some_and(|s| !s.is_empty())
}

/// The prompt (the part whose label tokens are ignored).
pub fn source_text(rec: &AlpacaRecord) -> String {
    match rec.input.as_deref() {
        Some(input) if !input.is_empty() => fill(PROMPT_INPUT, &rec.instruction, input),
        _ => fill(PROMPT_NO_INPUT, &rec.instruction, ""),
    }
}

/// The response the model learns: output followed by the eos token text.
pub fn target_text(rec: &AlpacaRecord, eos: &str) -> String {
    format!("{}{}", rec.output, eos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_input_byte_for_byte() {
        let r = AlpacaRecord::new("Add the numbers.", Some("2 3"), "5");
        assert_eq!(
            source_text(&r),
            "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n2 3\n\n### Response:"
        );
        assert_eq!(target_text(&r, "</s>"), "5</s>");
    }

    #[test]
    fn without_input_byte_for_byte() {
        let expected = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:";
        assert_eq!(
            source_text(&AlpacaRecord::new("Say hi.", None, "hi")),
            expected
        );
        assert_eq!(
            source_text(&AlpacaRecord::new("Say hi.", Some(""), "hi")),
            expected
        );
        // Whitespace is not empty: train.py compares with "" only.
        assert!(
            source_text(&AlpacaRecord::new("Say hi.", Some(" "), "hi")).contains("### Input:\n \n")
        );
    }

    #[test]
    fn braces_in_values_are_not_reinterpreted() {
        let r = AlpacaRecord::new("Print {input} and {x}", Some("{instruction}"), "");
        let s = source_text(&r);
        assert!(
            s.contains("### Instruction:\nPrint {input} and {x}\n\n### Input:\n{instruction}\n\n")
        );
    }

    #[test]
    fn chinese_text() {
        let r = AlpacaRecord::new("把这句话翻译成英文。", Some("我爱你"), "I love you");
        let s = source_text(&r);
        assert!(s.ends_with(
            "### Instruction:\n把这句话翻译成英文。\n\n### Input:\n我爱你\n\n### Response:"
        ));
    }
}
