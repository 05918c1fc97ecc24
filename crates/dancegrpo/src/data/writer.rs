//! Writing a dataset shard by shard, so that it is never half-valid, and
//! resuming an interrupted one.
//!
//! Order of writes: `dataset.json` (`complete: false`, the settings) first; then
//! per shard the safetensors file (temporary name, fsync, rename), then its
//! manifest lines (one append, fsync); `dataset.json` with `complete: true` and the
//! totals last. On resume the manifest is cut back to the last shard that is in
//! place with all its lines, later shards and temporary files are removed, and
//! writing continues from there, so the result is byte-identical to a run that
//! was never interrupted.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use tch::Tensor;

use super::compat::{check_same_input, check_same_settings};
use super::format::{
    parse_manifest, shard_name, DatasetCounts, DatasetInfo, ManifestEntry, INFO_FILE,
    MANIFEST_FILE, POOLED_PROMPT_EMBEDS, PROMPT_EMBEDS,
};
use crate::error::{Error, Result};
use crate::io::atomic::write_bytes_atomic;
use crate::io::safetensors::{write_safetensors, SafetensorsFile};

/// Where a new or resumed dataset stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriterStart {
    /// A new dataset (empty or missing directory).
    Fresh,
    /// An interrupted dataset, continued after `shards` complete shards.
    Resumed {
        /// Complete shards kept.
        shards: u64,
    },
    /// The dataset is already complete with the same settings: nothing to do.
    Complete,
}

/// Writes the shards of one dataset in order.
pub struct DatasetWriter {
    dir: PathBuf,
    info: DatasetInfo,
    manifest: Option<File>,
    shards_done: u64,
    truncated_clip: u64,
    truncated_t5: u64,
}

impl DatasetWriter {
    /// Starts the dataset `info` (with `complete: false`, `counts: None`) in `dir`,
    /// or resumes it when `dir` holds an interrupted dataset with the same settings.
    ///
    /// `check_prompt(index, prompt)` validates each kept manifest line against the
    /// input (e.g. the prompts file) and returns an error when they disagree.
    pub fn start(
        dir: &Path,
        info: DatasetInfo,
        check_prompt: &mut dyn FnMut(u64, &str) -> Result<()>,
    ) -> Result<(Self, WriterStart)> {
        let mut w = DatasetWriter {
            dir: dir.to_path_buf(),
            info,
            manifest: None,
            shards_done: 0,
            truncated_clip: 0,
            truncated_t5: 0,
        };
        match dir.join(INFO_FILE).exists() {
            false => w.start_fresh().map(|_| (w, WriterStart::Fresh)),
            true => w.resume(check_prompt).map(|start| (w, start)),
        }
    }

    /// A new dataset in a missing or empty directory.
    fn start_fresh(&mut self) -> Result<()> {
        let dir = self.dir.clone();
        refuse_foreign_dir(&dir)?;
        fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        self.remove_temporaries()?;
        write_bytes_atomic(&dir.join(INFO_FILE), self.info.to_json().as_bytes())?;
        write_bytes_atomic(&dir.join(MANIFEST_FILE), b"")?;
        self.open_manifest()
    }

    /// Continues the interrupted dataset in `self.dir` made with the same
    /// settings: keeps its complete shards, cuts back the rest.
    fn resume(
        &mut self,
        check_prompt: &mut dyn FnMut(u64, &str) -> Result<()>,
    ) -> Result<WriterStart> {
        let dir = self.dir.clone();
        let info_path = dir.join(INFO_FILE);
        let stored = DatasetInfo::read(&dir)?;
        let now = self.info.clone();
        check_same_settings(&info_path, &stored, &now)?;
        // Keep the stored description (e.g. the prompts file name as first given).
        self.info = DatasetInfo {
            complete: false,
            counts: None,
            ..stored.clone()
        };
        let entries = self.read_manifest(stored.complete)?;
        for (e, _) in &entries {
            check_prompt(e.index, &e.prompt)?;
        }
        check_same_input(&info_path, &stored, &now)?;
        let (keep, keep_bytes) = self.kept_shards(&entries);
        let kept_lines = (keep * self.info.shard_size).min(entries.len() as u64) as usize;
        for (e, _) in &entries[..kept_lines] {
            self.truncated_clip += (e.truncated_clip == Some(true)) as u64;
            self.truncated_t5 += (e.truncated_t5 == Some(true)) as u64;
        }
        if stored.complete {
            if keep == self.info.shard_count() && entries.len() as u64 == self.info.prompts {
                return Ok(WriterStart::Complete);
            }
            return Err(Error::Input(format!(
                "{} is marked complete but its shards or manifest are not; remove it and start again",
                dir.display()
            )));
        }
        self.cut_back(keep, keep_bytes)?;
        Ok(WriterStart::Resumed { shards: keep })
    }

    /// The manifest's good lines with the byte offset after each; only a line
    /// cut short by a crash may follow them.
    fn read_manifest(&self, complete: bool) -> Result<Vec<(ManifestEntry, u64)>> {
        let manifest_path = self.dir.join(MANIFEST_FILE);
        // A crash right after the first dataset.json may leave no manifest yet.
        if !manifest_path.exists() && !complete {
            write_bytes_atomic(&manifest_path, b"")?;
        }
        let bytes = fs::read(&manifest_path).map_err(|e| Error::io(&manifest_path, e))?;
        let (entries, bad) = parse_manifest(&manifest_path, &bytes, &self.info);
        match bad {
            Some(msg) if !msg.contains("cut short") => Err(Error::Input(format!(
                "{msg}; the dataset cannot be resumed, remove {} and start again",
                self.dir.display()
            ))),
            _ => Ok(entries),
        }
    }

    /// How many shards are in place with all their lines in the manifest, and
    /// the manifest's length in bytes up to them.
    fn kept_shards(&self, entries: &[(ManifestEntry, u64)]) -> (u64, u64) {
        let (mut keep, mut keep_bytes) = (0u64, 0u64);
        while keep < self.info.shard_count() {
            let rows = self.info.shard_rows(keep);
            let last_line = keep * self.info.shard_size + rows; // lines needed
            if (entries.len() as u64) < last_line || !self.shard_is_valid(keep, rows) {
                break;
            }
            keep_bytes = entries[last_line as usize - 1].1;
            keep += 1;
        }
        (keep, keep_bytes)
    }

    /// Cuts the manifest back to `keep_bytes`, removes the shards from `keep`
    /// on and temporaries, and reopens the manifest for appending.
    fn cut_back(&mut self, keep: u64, keep_bytes: u64) -> Result<()> {
        let manifest_path = self.dir.join(MANIFEST_FILE);
        let f = OpenOptions::new()
            .write(true)
            .open(&manifest_path)
            .map_err(|e| Error::io(&manifest_path, e))?;
        f.set_len(keep_bytes)
            .and_then(|_| f.sync_all())
            .map_err(|e| Error::io(&manifest_path, e))?;
        for k in keep.. {
            let p = self.dir.join(shard_name(k));
            if !p.exists() {
                if k >= self.info.shard_count() {
                    break;
                }
                continue;
            }
            fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
        }
        self.remove_temporaries()?;
        self.shards_done = keep;
        self.open_manifest()
    }

    /// The dataset directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The dataset description being written.
    pub fn info(&self) -> &DatasetInfo {
        &self.info
    }

    /// Shards complete so far.
    pub fn shards_done(&self) -> u64 {
        self.shards_done
    }

    /// The index of the first prompt not yet written.
    pub fn next_index(&self) -> u64 {
        (self.shards_done * self.info.shard_size).min(self.info.prompts)
    }

    /// Writes the next shard: `prompt_embeds [n, Lt, d]`, `pooled [n, p]` and the
    /// manifest entries of its `n` prompts (indices from [`Self::next_index`]).
    pub fn write_shard(
        &mut self,
        prompt_embeds: &Tensor,
        pooled: &Tensor,
        entries: &[ManifestEntry],
    ) -> Result<()> {
        let k = self.shards_done;
        let rows = self.info.shard_rows(k);
        let i = &self.info;
        let kind = i.dtype.kind();
        let want_t = [rows as i64, i.text_len, i.text_dim];
        let want_p = [rows as i64, i.pooled_dim];
        if prompt_embeds.size() != want_t
            || pooled.size() != want_p
            || prompt_embeds.kind() != kind
            || pooled.kind() != kind
            || entries.len() as u64 != rows
        {
            return Err(Error::Input(format!(
                "shard {k}: got prompt_embeds {:?} {:?}, pooled {:?} {:?}, {} entries; want {want_t:?}, {want_p:?} of {kind:?}, {rows} entries",
                prompt_embeds.size(),
                prompt_embeds.kind(),
                pooled.size(),
                pooled.kind(),
                entries.len()
            )));
        }
        for (r, e) in entries.iter().enumerate() {
            let idx = k * i.shard_size + r as u64;
            if (e.index, e.shard, e.offset) != (idx, k, r as u64) {
                return Err(Error::Input(format!(
                    "shard {k}: entry {r} is ({}, {}, {}), want ({idx}, {k}, {r})",
                    e.index, e.shard, e.offset
                )));
            }
        }
        let path = self.dir.join(shard_name(k));
        write_safetensors(
            &path,
            &[
                (PROMPT_EMBEDS.to_string(), prompt_embeds.shallow_clone()),
                (POOLED_PROMPT_EMBEDS.to_string(), pooled.shallow_clone()),
            ],
            &Default::default(),
        )?;
        let text: String = entries.iter().map(ManifestEntry::to_line).collect();
        let manifest_path = self.dir.join(MANIFEST_FILE);
        let f = self.manifest.as_mut().expect("manifest open");
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_data())
            .map_err(|e| Error::io(&manifest_path, e))?;
        for e in entries {
            self.truncated_clip += (e.truncated_clip == Some(true)) as u64;
            self.truncated_t5 += (e.truncated_t5 == Some(true)) as u64;
        }
        self.shards_done += 1;
        Ok(())
    }

    /// Marks the dataset complete (every shard written) with its totals.
    pub fn finish(mut self, skipped_empty: u64, skipped_cjk: u64) -> Result<DatasetInfo> {
        if self.shards_done != self.info.shard_count() {
            return Err(Error::Input(format!(
                "{}: {} of {} shards written",
                self.dir.display(),
                self.shards_done,
                self.info.shard_count()
            )));
        }
        self.info.counts = Some(DatasetCounts {
            shards: self.shards_done,
            truncated_clip: self.truncated_clip,
            truncated_t5: self.truncated_t5,
            skipped_empty,
            skipped_cjk,
        });
        self.info.complete = true;
        self.manifest = None;
        write_bytes_atomic(&self.dir.join(INFO_FILE), self.info.to_json().as_bytes())?;
        Ok(self.info)
    }

    fn open_manifest(&mut self) -> Result<()> {
        let p = self.dir.join(MANIFEST_FILE);
        self.manifest = Some(
            OpenOptions::new()
                .append(true)
                .open(&p)
                .map_err(|e| Error::io(&p, e))?,
        );
        Ok(())
    }

    fn shard_is_valid(&self, k: u64, rows: u64) -> bool {
        let Ok(f) = SafetensorsFile::open(self.dir.join(shard_name(k))) else {
            return false;
        };
        let i = &self.info;
        let dtype = crate::io::safetensors::dtype_of(i.dtype.kind());
        let ok = |name: &str, shape: &[i64]| {
            f.info(name)
                .is_some_and(|t| t.shape == shape && Some(t.dtype) == dtype)
        };
        ok(PROMPT_EMBEDS, &[rows as i64, i.text_len, i.text_dim])
            && ok(POOLED_PROMPT_EMBEDS, &[rows as i64, i.pooled_dim])
    }

    /// Removes temporary files a crash may have left (`.shard-*.tmp-*`,
    /// `.dataset.json.tmp-*`, `.manifest.jsonl.tmp-*`).
    fn remove_temporaries(&self) -> Result<()> {
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return Ok(());
        };
        for e in rd.filter_map(|e| e.ok()) {
            if is_temporary(&e.file_name().to_string_lossy()) {
                fs::remove_file(e.path()).map_err(|err| Error::io(e.path(), err))?;
            }
        }
        Ok(())
    }
}

/// Refuses a directory that holds something but no dataset.
fn refuse_foreign_dir(dir: &Path) -> Result<()> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Ok(());
    };
    let foreign =
        (rd.filter_map(|e| e.ok())).find(|e| !is_temporary(&e.file_name().to_string_lossy()));
    match foreign {
        None => Ok(()),
        Some(e) => Err(Error::io(
            dir,
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!(
                    "exists and is not a dataset (no {INFO_FILE}, but `{}`); choose a new output directory or remove it",
                    e.file_name().to_string_lossy()
                ),
            ),
        )),
    }
}

/// A temporary file of an atomic write (`.NAME.tmp-PID`).
fn is_temporary(name: &str) -> bool {
    name.starts_with('.') && name.contains(".tmp-")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::format::{DatasetSource, EmbedDtype, FORMAT_NAME, FORMAT_VERSION};
    use crate::data::EmbeddingDataset;
    use crate::data::PromptSet;
    use tch::{Device, Kind};

    fn info(prompts: u64) -> DatasetInfo {
        DatasetInfo {
            format: FORMAT_NAME.into(),
            version: FORMAT_VERSION,
            source: DatasetSource::Reference {
                dir: "/nowhere".into(),
                index_hash: "0".into(),
            },
            prompts,
            shard_size: 2,
            text_len: 3,
            text_dim: 4,
            pooled_dim: 2,
            dtype: EmbedDtype::Bf16,
            counts: None,
            complete: false,
        }
    }

    fn rows(start: u64, n: u64) -> (Tensor, Tensor, Vec<ManifestEntry>) {
        let opts = (Kind::Float, Device::Cpu);
        let t = (Tensor::arange_start(start as i64 * 12, (start + n) as i64 * 12, opts) * 0.1)
            .view([n as i64, 3, 4])
            .to_kind(Kind::BFloat16);
        let p = Tensor::arange_start(start as i64 * 2, (start + n) as i64 * 2, opts)
            .view([n as i64, 2])
            .to_kind(Kind::BFloat16);
        let e = (start..start + n)
            .map(|i| ManifestEntry {
                index: i,
                prompt: format!("p{i}"),
                shard: i / 2,
                offset: i % 2,
                truncated_clip: None,
                truncated_t5: Some(i == 3),
            })
            .collect();
        (t, p, e)
    }

    fn ok(_: u64, _: &str) -> Result<()> {
        Ok(())
    }

    #[test]
    fn write_read_resume_and_refuse_incomplete() {
        let dir = std::env::temp_dir().join(format!("dg-data-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let (mut w, start) = DatasetWriter::start(&dir, info(5), &mut ok).unwrap();
        assert_eq!(start, WriterStart::Fresh);
        for k in 0..2 {
            let (t, p, e) = rows(k * 2, 2);
            w.write_shard(&t, &p, &e).unwrap();
        }
        // wrong row count for the last shard is refused before anything is written
        let (t, p, e) = rows(4, 2);
        assert!(w.write_shard(&t, &p, &e).is_err());
        drop(w);
        let e = EmbeddingDataset::open(&dir).err().unwrap().to_string();
        assert!(
            e.contains("incomplete") && e.contains("2 of 3 shards"),
            "{e}"
        );

        // a torn shard 1 file and a half line: resume keeps shard 0 only
        let m = dir.join(MANIFEST_FILE);
        let text = fs::read_to_string(&m).unwrap();
        assert_eq!(text.lines().count(), 4);
        fs::write(&m, text.clone() + r#"{"index":4,"pro"#).unwrap();
        let shard1 = fs::read(dir.join(shard_name(1))).unwrap();
        fs::write(dir.join(shard_name(1)), &shard1[..shard1.len() / 2]).unwrap();
        let (mut w, start) = DatasetWriter::start(&dir, info(5), &mut ok).unwrap();
        assert_eq!(start, WriterStart::Resumed { shards: 1 });
        assert_eq!(w.next_index(), 2);
        assert!(!dir.join(shard_name(1)).exists());
        for (k, n) in [(1, 2), (2, 1)] {
            let (t, p, e) = rows(k * 2, n);
            w.write_shard(&t, &p, &e).unwrap();
        }
        let done = w.finish(0, 0).unwrap();
        assert_eq!(done.counts.as_ref().unwrap().truncated_t5, 1);
        assert_eq!(fs::read_to_string(&m).unwrap(), {
            let all: String = (0..5).map(|i| rows(i, 1).2[0].to_line()).collect();
            all
        });

        let ds = EmbeddingDataset::open(&dir).unwrap();
        assert_eq!(ds.len(), 5);
        for i in 0..5 {
            let e = ds.get(i).unwrap();
            let (t, p, _) = rows(i, 1);
            assert!(
                e.text.equal(&t.get(0)) && e.pooled.equal(&p.get(0)),
                "row {i}"
            );
            assert_eq!(e.caption, format!("p{i}"));
        }
        assert!(ds.get(5).is_err());
        drop(ds);

        // a crash right after the first dataset.json: no manifest yet, a temporary file
        let dir2 = dir.with_extension("early");
        let _ = fs::remove_dir_all(&dir2);
        drop(DatasetWriter::start(&dir2, info(5), &mut ok).unwrap());
        fs::remove_file(dir2.join(MANIFEST_FILE)).unwrap();
        fs::write(dir2.join(".manifest.jsonl.tmp-7"), b"x").unwrap();
        let (w, start) = DatasetWriter::start(&dir2, info(5), &mut ok).unwrap();
        assert_eq!(start, WriterStart::Resumed { shards: 0 });
        assert_eq!(w.next_index(), 0);
        assert!(!dir2.join(".manifest.jsonl.tmp-7").exists());
        fs::remove_dir_all(&dir2).unwrap();

        // a complete dataset with a shard missing is named
        fs::remove_file(dir.join(shard_name(2))).unwrap();
        let e = EmbeddingDataset::open(&dir).err().unwrap().to_string();
        assert!(
            e.contains("shard-00002.safetensors") && e.contains("missing"),
            "{e}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
