//! The benchmark data: the items of a `.csv` / `.jsonl` file in the authors' format or a
//! hub dataset, validated with errors that name the file, line and field; the selection of
//! items a run covers (scenarios, categories, ids, limit, shard); and the authors' scorer
//! CSV ([`official`]), read and written.

mod dataset;
pub mod official;

pub use dataset::{fnv1a64, read_id_file, DataStats, Dataset, Selection, Shard, COLUMNS};
