//! Raw blocks in and out of a volume: write-blocks, read-blocks.

use std::path::{Path, PathBuf};

use super::common::{open_volume, Env};
use super::Error;
use crate::volume::Lba;
use crate::BLOCK_SIZE;

/// `lsvfs write-blocks VOLUME --offset B --input FILE`.
pub fn write(
    env: &Env,
    path: &Path,
    key_file: Option<PathBuf>,
    offset: u64,
    input: &Path,
) -> Result<(), Error> {
    if offset % BLOCK_SIZE as u64 != 0 {
        return Err(Error::Usage("--offset must be a multiple of 4096".into()));
    }
    let mut data =
        std::fs::read(input).map_err(|e| Error::io(format!("reading {}", input.display()), e))?;
    data.resize(data.len().div_ceil(BLOCK_SIZE) * BLOCK_SIZE, 0);
    let v = open_volume(path, &env.keys(key_file), false, &env.tuning)?;
    let chunk = 256 * BLOCK_SIZE;
    for (i, c) in data.chunks(chunk).enumerate() {
        v.write(Lba(offset / BLOCK_SIZE as u64 + (i * 256) as u64), c)?;
    }
    v.flush()?;
    v.close()?;
    println!("wrote {} bytes at offset {offset}", data.len());
    Ok(())
}

/// `lsvfs read-blocks VOLUME --offset B --length N --output FILE`.
pub fn read(
    env: &Env,
    path: &Path,
    key_file: Option<PathBuf>,
    offset: u64,
    length: u64,
    output: &Path,
) -> Result<(), Error> {
    if offset % BLOCK_SIZE as u64 != 0 || length % BLOCK_SIZE as u64 != 0 {
        return Err(Error::Usage(
            "--offset and --length must be multiples of 4096".into(),
        ));
    }
    let v = open_volume(path, &env.keys(key_file), true, &env.tuning)?;
    let mut out = vec![0u8; length as usize];
    v.read(Lba(offset / BLOCK_SIZE as u64), &mut out)?;
    std::fs::write(output, &out)
        .map_err(|e| Error::io(format!("writing {}", output.display()), e))?;
    println!(
        "read {length} bytes at offset {offset} into {}",
        output.display()
    );
    Ok(())
}
