//! Continuous batching: sequences that join a running batch at different steps, with prompts
//! shorter and longer than what the batch already holds, each get the answer `generate` gives
//! them alone; finished and cancelled ones leave without disturbing the rest.

mod common;

use herd_model::decode::{DecodeBatch, Emitted, Finish, SeqId};
use herd_model::generate::{generate, GenerateOptions};
use herd_model::Llama;
use std::collections::BTreeMap;

/// Tokens and end of every prompt's sequence, from what admit and step emitted.
#[derive(Default)]
struct Record {
    prompt_of: BTreeMap<SeqId, usize>,
    tokens: BTreeMap<usize, Vec<u32>>,
    ends: BTreeMap<usize, Finish>,
}

impl Record {
    fn take(&mut self, e: Emitted) {
        let i = self.prompt_of[&e.seq];
        assert!(!self.ends.contains_key(&i), "{e:?} after its end");
        self.tokens.entry(i).or_default().extend(e.token);
        if let Some(f) = e.finish {
            self.ends.insert(i, f);
        }
    }
}

fn prompts() -> Vec<Vec<u32>> {
    vec![
        vec![1, 7, 19, 33, 2],
        vec![1, 9],                              // joins shorter than the batch
        vec![1, 45, 3, 17, 8, 8, 21, 30, 12, 6], // joins longer than the batch
        vec![4, 4, 11],
        vec![1, 2, 3, 4, 5, 6, 7],
    ]
}

/// Admit prompt i before step `joins[i]`, step until all have ended.
fn run(model: &Llama, eos: Option<u32>, opts: &[GenerateOptions], joins: &[usize]) -> Record {
    let mut batch = DecodeBatch::new(model, eos.as_slice());
    let mut rec = Record::default();
    let ps = prompts();
    let mut step = 0;
    loop {
        // Those joining at this step are prefilled together.
        let now: Vec<usize> = (0..ps.len()).filter(|&i| joins[i] == step).collect();
        let requests: Vec<(&[u32], GenerateOptions)> = now
            .iter()
            .map(|&i| (ps[i].as_slice(), opts[i].clone()))
            .collect();
        for (e, &i) in batch.admit_all(&requests).unwrap().into_iter().zip(&now) {
            rec.prompt_of.insert(e.seq, i);
            rec.take(e);
        }
        if batch.is_empty() && joins.iter().all(|&j| j <= step) {
            return rec;
        }
        for e in batch.step().unwrap() {
            rec.take(e);
        }
        step += 1;
    }
}

#[test]
fn sequences_joining_a_running_batch_get_the_answers_they_get_alone() {
    let model = Llama::random(common::tiny_config(false), 5).unwrap();
    for (joins, (temperature, top_p)) in [
        ([0, 3, 3, 6, 20], (0.0, 1.0)),
        ([0, 3, 3, 6, 20], (0.8, 0.9)),
        ([0, 0, 0, 4, 4], (0.0, 1.0)),
        ([2, 0, 1, 1, 0], (0.8, 0.9)),
    ] {
        let opts: Vec<GenerateOptions> = (0..5)
            .map(|i| GenerateOptions {
                max_new_tokens: [12, 4, 15, 9, 6][i],
                temperature,
                top_p,
                seed: 100 + i as u64,
                logprobs: None,
            })
            .collect();
        for eos in [
            None,
            Some(generate(&model, &prompts()[0], &[], &opts[0]).unwrap()[3]),
        ] {
            let rec = run(&model, eos, &opts, &joins);
            let joins = format!("{joins:?}");
            for (i, p) in prompts().iter().enumerate() {
                let alone = generate(&model, p, eos.as_slice(), &opts[i]).unwrap();
                assert_eq!(
                    rec.tokens[&i], alone,
                    "sequence {i}, joins {joins}, temperature {temperature}, eos {eos:?}"
                );
                let end = if alone.len() == opts[i].max_new_tokens {
                    Finish::Length
                } else {
                    Finish::Eos
                };
                assert_eq!(rec.ends[&i], end, "sequence {i}");
            }
            if eos.is_some() {
                assert!(
                    rec.ends.values().any(|&f| f == Finish::Eos),
                    "the eos ends some sequence early"
                );
            }
        }
    }
}

#[test]
fn leaving_rows_cut_the_pads_and_a_cancelled_row_leaves_the_rest_unchanged() {
    let model = Llama::random(common::tiny_config(false), 6).unwrap();
    let opts = |n| GenerateOptions {
        max_new_tokens: n,
        ..Default::default()
    };
    let (short, long) = (vec![1u32, 9], vec![1u32, 45, 3, 17, 8, 8, 21, 30]);
    let mut batch = DecodeBatch::new(&model, &[]);
    let a = batch.admit(&short, opts(20)).unwrap();
    let b = batch.admit(&long, opts(3)).unwrap();
    let c = batch.admit(&short, opts(20)).unwrap();
    // The long prompt widened the batch: the short rows are padded to it.
    assert_eq!(batch.width(), long.len());
    let mut got: BTreeMap<SeqId, Vec<u32>> = BTreeMap::new();
    for e in [&a, &b, &c] {
        got.entry(e.seq).or_default().extend(e.token);
    }
    for _ in 0..2 {
        for e in batch.step().unwrap() {
            got.entry(e.seq).or_default().extend(e.token);
        }
    }
    // b has its 3 tokens and left; the short rows' common pad is gone with it: each spans its
    // prompt and the two tokens it was fed.
    assert_eq!(batch.len(), 2);
    assert_eq!(batch.width(), short.len() + 2);
    assert!(batch.cancel(c.seq).unwrap());
    assert!(!batch.cancel(c.seq).unwrap(), "already gone");
    assert_eq!(batch.len(), 1);
    while !batch.is_empty() {
        for e in batch.step().unwrap() {
            assert_eq!(e.seq, a.seq, "only a is left");
            got.entry(e.seq).or_default().extend(e.token);
        }
    }
    assert_eq!(
        got[&a.seq],
        generate(&model, &short, &[], &opts(20)).unwrap()
    );
    assert_eq!(got[&b.seq], generate(&model, &long, &[], &opts(3)).unwrap());
    assert_eq!(got[&c.seq].len(), 3, "c ran until it was cancelled");
    assert!(batch.step().unwrap().is_empty());
}

#[test]
fn a_sequence_can_end_at_admission_and_bad_input_is_refused() {
    let model = Llama::random(common::tiny_config(false), 7).unwrap();
    let mut batch = DecodeBatch::new(&model, &[]);
    let opts = |n| GenerateOptions {
        max_new_tokens: n,
        ..Default::default()
    };
    let none = batch.admit(&[1, 2], opts(0)).unwrap();
    assert_eq!((none.token, none.finish), (None, Some(Finish::Length)));
    let one = batch.admit(&[1, 2], opts(1)).unwrap();
    assert_eq!(
        one.token,
        generate(&model, &[1, 2], &[], &opts(1))
            .unwrap()
            .first()
            .copied()
    );
    assert_eq!(one.finish, Some(Finish::Length));
    assert!(batch.is_empty(), "neither joined the batch");
    let first = one.token.unwrap();
    let mut stops = DecodeBatch::new(&model, &[first]);
    let e = stops.admit(&[1, 2], opts(5)).unwrap();
    assert_eq!((e.token, e.finish), (None, Some(Finish::Eos)));
    // Prefilled together, one ends at once, one never runs, one joins; the joining row's pads
    // (for the longer prompt that left) are cut.
    let long = [1u32, 2, 3, 4, 5, 6];
    let es = batch
        .admit_all(&[(&long, opts(1)), (&[1, 2], opts(4)), (&[7], opts(0))])
        .unwrap();
    assert_eq!(es[0].finish, Some(Finish::Length));
    assert!(es[0].token.is_some());
    assert_eq!(es[1].finish, None);
    assert_eq!((es[2].token, es[2].finish), (None, Some(Finish::Length)));
    assert_eq!((batch.len(), batch.width()), (1, 2));
    let mut got: Vec<u32> = es[1].token.into_iter().collect();
    while !batch.is_empty() {
        got.extend(batch.step().unwrap().into_iter().filter_map(|e| e.token));
    }
    assert_eq!(got, generate(&model, &[1, 2], &[], &opts(4)).unwrap());
    assert!(batch.admit(&[], opts(3)).is_err());
    let bad = GenerateOptions {
        top_p: 0.0,
        ..opts(3)
    };
    assert!(batch.admit(&[1], bad).is_err());
}

/// Each decoded token's reported log-probability is what scoring the finished sequence in one
/// forward pass gives it (`logprob::prompt_logprobs`), for rows that share the batch, sampled
/// or greedy; a greedy row's token is its own top choice.
#[test]
fn reported_logprobs_equal_scoring_the_whole_sequence() {
    let model = Llama::random(common::tiny_config(false), 11).unwrap();
    let mut batch = DecodeBatch::new(&model, &[]);
    let opts = |temperature, seed| GenerateOptions {
        max_new_tokens: 6,
        temperature,
        seed,
        logprobs: Some(3),
        ..Default::default()
    };
    let prompts = [vec![1u32, 7, 19, 33], vec![1, 9]];
    let first = batch
        .admit_all(&[(&prompts[0], opts(0.0, 0)), (&prompts[1], opts(1.0, 5))])
        .unwrap();
    let mut got: BTreeMap<SeqId, Vec<Emitted>> = BTreeMap::new();
    let seqs: Vec<SeqId> = first.iter().map(|e| e.seq).collect();
    for e in first {
        got.entry(e.seq).or_default().push(e);
    }
    while !batch.is_empty() {
        for e in batch.step().unwrap() {
            got.entry(e.seq).or_default().push(e);
        }
    }
    for (p, seq) in seqs.iter().enumerate() {
        let emitted = &got[seq];
        let tokens: Vec<u32> = emitted.iter().filter_map(|e| e.token).collect();
        assert_eq!(tokens.len(), 6);
        let mut whole = prompts[p].clone();
        whole.extend(&tokens);
        let scored = herd_model::logprob::prompt_logprobs(&model, &whole, 3).unwrap();
        let of_answer = &scored[prompts[p].len() - 1..];
        for (e, want) in emitted.iter().zip(of_answer) {
            let lp = e.logprob.as_ref().expect("asked for logprobs");
            assert_eq!(lp.token, want.token);
            assert!(
                (lp.logprob - want.logprob).abs() < 1e-4,
                "{} vs {}",
                lp.logprob,
                want.logprob
            );
            let ids = |t: &[(u32, f32)]| t.iter().map(|x| x.0).collect::<Vec<_>>();
            assert_eq!(ids(&lp.top), ids(&want.top));
            if p == 0 {
                assert_eq!(lp.top[0].0, lp.token, "greedy takes the top token");
            }
        }
    }
    // Without the option nothing is reported.
    let e = batch.admit(&[1, 2], GenerateOptions::default()).unwrap();
    assert!(e.logprob.is_none());
}
