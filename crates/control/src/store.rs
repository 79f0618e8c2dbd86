//! The daemon's state in one redb file: a table per kind of resource, each record JSON
//! (docs/cloud-api.md, "State"). Every write is one transaction, durable when it returns.

use crate::ControlError;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::Path;

/// A kind of record.
#[derive(Clone, Copy, Debug)]
pub enum Table {
    /// Tenants by name.
    Tenants,
    /// API keys by id.
    Keys,
    /// Images by `tenant/id`.
    Images,
    /// Instance types by name.
    InstanceTypes,
    /// VMs by id.
    Vms,
    /// Snapshots by id.
    Snapshots,
}

const ALL: [Table; 6] = [
    Table::Tenants,
    Table::Keys,
    Table::Images,
    Table::InstanceTypes,
    Table::Vms,
    Table::Snapshots,
];

impl Table {
    fn definition(self) -> TableDefinition<'static, &'static str, &'static [u8]> {
        TableDefinition::new(match self {
            Self::Tenants => "tenants",
            Self::Keys => "keys",
            Self::Images => "images",
            Self::InstanceTypes => "instance_types",
            Self::Vms => "vms",
            Self::Snapshots => "snapshots",
        })
    }
}

/// The state file.
pub struct Store {
    db: Database,
}

fn decode<T: DeserializeOwned>(table: Table, key: &str, bytes: &[u8]) -> Result<T, ControlError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ControlError::Store(format!("record {key:?} of {table:?} is unreadable: {e}")))
}

impl Store {
    /// Opens the state file at `path`, making it (and its tables) if needed.
    pub fn open(path: &Path) -> Result<Self, ControlError> {
        let db = Database::create(path).map_err(|e| ControlError::Store(format!("{}: {e}", path.display())))?;
        let txn = db.begin_write()?;
        for table in ALL {
            txn.open_table(table.definition())?;
        }
        txn.commit()?;
        Ok(Self { db })
    }

    /// The record `key` of `table`.
    pub fn get<T: DeserializeOwned>(&self, table: Table, key: &str) -> Result<Option<T>, ControlError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(table.definition())?;
        let found = match t.get(key)? {
            Some(v) => Some(decode(table, key, v.value())?),
            None => None,
        };
        Ok(found)
    }

    /// Every record of `table`, in key order.
    pub fn list<T: DeserializeOwned>(&self, table: Table) -> Result<Vec<T>, ControlError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(table.definition())?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push(decode(table, k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Writes `value` as the record `key` of `table`.
    pub fn put<T: Serialize>(&self, table: Table, key: &str, value: &T) -> Result<(), ControlError> {
        let bytes = serde_json::to_vec(value).map_err(|e| ControlError::Store(e.to_string()))?;
        let txn = self.db.begin_write()?;
        txn.open_table(table.definition())?.insert(key, bytes.as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// Writes `value` as the record `key` of `table` unless there is one; false if there was.
    pub fn put_new<T: Serialize>(&self, table: Table, key: &str, value: &T) -> Result<bool, ControlError> {
        let bytes = serde_json::to_vec(value).map_err(|e| ControlError::Store(e.to_string()))?;
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(table.definition())?;
            if t.get(key)?.is_some() {
                return Ok(false);
            }
            t.insert(key, bytes.as_slice())?;
        }
        txn.commit()?;
        Ok(true)
    }

    /// Removes the record `key` of `table`; whether there was one.
    pub fn delete(&self, table: Table, key: &str) -> Result<bool, ControlError> {
        let txn = self.db.begin_write()?;
        let existed = txn.open_table(table.definition())?.remove(key)?.is_some();
        txn.commit()?;
        Ok(existed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_a_reopen() {
        let path = std::env::temp_dir().join(format!("xcloud-store-{}.redb", std::process::id()));
        let _ = std::fs::remove_file(&path);
        {
            let s = Store::open(&path).expect("open");
            s.put(Table::Vms, "vm-1", &serde_json::json!({"a": 1})).expect("put");
            assert!(!s
                .put_new(Table::Vms, "vm-1", &serde_json::json!({"a": 2}))
                .expect("put_new"));
            assert!(s
                .put_new(Table::Vms, "vm-2", &serde_json::json!({"a": 3}))
                .expect("put_new"));
        }
        let s = Store::open(&path).expect("reopen");
        let v: Option<serde_json::Value> = s.get(Table::Vms, "vm-1").expect("get");
        assert_eq!(v, Some(serde_json::json!({"a": 1})));
        assert_eq!(s.list::<serde_json::Value>(Table::Vms).expect("list").len(), 2);
        assert!(s.delete(Table::Vms, "vm-1").expect("delete"));
        assert!(!s.delete(Table::Vms, "vm-1").expect("delete again"));
        let _ = std::fs::remove_file(&path);
    }
}
