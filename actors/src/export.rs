//! `keel sessions export DIR` (R6): one `{session}.json` per session, each
//! written atomically (temp + fsync + rename + dir fsync) with mode 0600,
//! under a file name that no session id can turn into a path outside DIR.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::error::StoreError;
use crate::ids::session_file_name;
use crate::persistence::portable::sessions;
use crate::persistence::sql::Sql;
use crate::persistence::write_atomic;

/// Export every session in `db` (either backend) into `dir`, telling
/// `progress(done, total)` (sessions) after each file written. Returns the
/// files written.
pub fn export_sessions_noted(
    db: &mut dyn Sql,
    dir: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Vec<PathBuf>, StoreError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| StoreError::Invalid(format!("cannot create {}: {e}", dir.display())))?;
    let mut written = Vec::new();
    let list = sessions::list_sessions(db)?;
    let total = list.len() as u64;
    for s in list {
        let turns = sessions::session_turns(db, &s.id, 0, i64::MAX)?.unwrap_or_default();
        let memory: Value = sessions::session_memory(db, &s.id)?
            .and_then(|m| serde_json::from_str(&m).ok())
            .unwrap_or_else(|| json!({}));
        let doc = json!({
            "id": s.id,
            "channel": s.channel,
            "chat": s.chat,
            "created_at": s.created_at,
            "updated_at": s.updated_at,
            "memory": memory,
            "turns": turns,
        });
        let path = dir.join(session_file_name(&s.id));
        let bytes =
            serde_json::to_vec_pretty(&doc).map_err(|e| StoreError::Invalid(e.to_string()))?;
        write_atomic(&path, &bytes)
            .map_err(|e| StoreError::Invalid(format!("cannot write {}: {e}", path.display())))?;
        written.push(path);
        progress(written.len() as u64, total);
    }
    Ok(written)
}
