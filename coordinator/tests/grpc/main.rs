//! The coordinator served in-process on 127.0.0.1:0, driven by tonic clients: a "fake worker" is
//! a test that calls the Workers service by hand.

mod access;
mod harness;
mod recovery;
mod run;
