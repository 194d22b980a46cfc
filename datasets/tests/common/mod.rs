//! Helpers shared by the integration tests: writing small files in each format.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datasets::{Example, Message, Origin, Record};
use polars::prelude::*;

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, text).unwrap();
    p
}

/// One Parquet cell of a message-list column.
pub fn messages_series(msgs: &[(&str, &str)]) -> Series {
    let roles = Series::new("role".into(), msgs.iter().map(|m| m.0).collect::<Vec<_>>());
    let contents = Series::new("content".into(), msgs.iter().map(|m| m.1).collect::<Vec<_>>());
    StructChunked::from_series("item".into(), msgs.len(), [roles, contents].iter()).unwrap().into_series()
}

pub enum Col {
    Text(&'static str, Vec<Option<&'static str>>),
    Float(&'static str, Vec<Option<f64>>),
    Messages(&'static str, Vec<Vec<(&'static str, &'static str)>>),
}

pub fn write_parquet(dir: &Path, name: &str, cols: Vec<Col>) -> PathBuf {
    let columns: Vec<Column> = cols
        .into_iter()
        .map(|c| match c {
            Col::Text(n, v) => Series::new(n.into(), v).into(),
            Col::Float(n, v) => Series::new(n.into(), v).into(),
            Col::Messages(n, rows) => {
                let cells: Vec<Series> = rows.iter().map(|r| messages_series(r)).collect();
                Series::new(n.into(), cells).into()
            }
        })
        .collect();
    let mut df = DataFrame::new_infer_height(columns).unwrap();
    let p = dir.join(name);
    let f = fs::File::create(&p).unwrap();
    ParquetWriter::new(f).finish(&mut df).unwrap();
    p
}

pub fn example(record: Record) -> Example {
    example_at(record, "mem", 1)
}

pub fn example_at(record: Record, file: &str, row: usize) -> Example {
    Example { record, category: None, origin: Origin { file: Arc::from(Path::new(file)), row } }
}

pub fn conv(user: &str, model: &str) -> Record {
    Record::Conversation { messages: vec![Message::user(user), Message::model(model)] }
}
