//! The campaign walker: typed reads of TOML keys that collect every problem with its key path
//! instead of stopping at the first.

pub(crate) struct Walker {
    pub(crate) problems: Vec<String>,
}

impl Walker {
    pub(crate) fn unknown(&mut self, t: &toml::Table, path: &str, known: &[&str]) {
        for k in t.keys() {
            if !known.contains(&k.as_str()) {
                self.problems.push(format!(
                    "{}: unknown key (expected one of: {})",
                    join(path, k),
                    known.join(", ")
                ));
            }
        }
    }
    pub(crate) fn str_opt(&mut self, t: &toml::Table, path: &str, key: &str) -> Option<String> {
        match t.get(key) {
            None => None,
            Some(toml::Value::String(s)) => Some(s.clone()),
            Some(v) => {
                self.problems.push(format!(
                    "{}: expected a string, got {}",
                    join(path, key),
                    v.type_str()
                ));
                None
            }
        }
    }
    /// A string key that names one of a closed set of choices (`T`'s `FromStr`).
    pub(crate) fn choice<T: std::str::FromStr<Err = String>>(
        &mut self,
        t: &toml::Table,
        path: &str,
        key: &str,
    ) -> Option<T> {
        let v = self.str_opt(t, path, key)?;
        match v.parse() {
            Ok(c) => Some(c),
            Err(e) => {
                self.problems.push(format!("{}: {e}", join(path, key)));
                None
            }
        }
    }
    /// A non-negative integer that fits a `u32` (range rules belong to the settings'
    /// `validate()`).
    pub(crate) fn u32_opt(&mut self, t: &toml::Table, path: &str, key: &str) -> Option<u32> {
        self.int_opt(t, path, key, 0)
            .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
    }
    /// Any number (range rules belong to the settings' `validate()`).
    pub(crate) fn num_opt(&mut self, t: &toml::Table, path: &str, key: &str) -> Option<f32> {
        self.f32_opt(t, path, key, f64::MIN, f64::MAX)
    }
    pub(crate) fn int_opt(
        &mut self,
        t: &toml::Table,
        path: &str,
        key: &str,
        min: i64,
    ) -> Option<i64> {
        match t.get(key) {
            None => None,
            Some(toml::Value::Integer(i)) if *i >= min => Some(*i),
            Some(toml::Value::Integer(i)) => {
                self.problems
                    .push(format!("{} must be >= {min} (got {i})", join(path, key)));
                None
            }
            Some(v) => {
                self.problems.push(format!(
                    "{}: expected an integer, got {}",
                    join(path, key),
                    v.type_str()
                ));
                None
            }
        }
    }
    pub(crate) fn bool_opt(&mut self, t: &toml::Table, path: &str, key: &str) -> Option<bool> {
        match t.get(key) {
            None => None,
            Some(toml::Value::Boolean(b)) => Some(*b),
            Some(v) => {
                self.problems.push(format!(
                    "{}: expected true or false, got {}",
                    join(path, key),
                    v.type_str()
                ));
                None
            }
        }
    }
    pub(crate) fn float(v: &toml::Value) -> Option<f64> {
        match v {
            toml::Value::Float(f) => Some(*f),
            toml::Value::Integer(i) => Some(*i as f64),
            _ => None,
        }
    }
    pub(crate) fn f32_opt(
        &mut self,
        t: &toml::Table,
        path: &str,
        key: &str,
        lo: f64,
        hi: f64,
    ) -> Option<f32> {
        let v = t.get(key)?;
        match Self::float(v) {
            Some(f) if (lo..=hi).contains(&f) => Some(f as f32),
            Some(f) => {
                self.problems.push(format!(
                    "{} must be in [{lo}, {hi}] (got {f})",
                    join(path, key)
                ));
                None
            }
            None => {
                self.problems.push(format!(
                    "{}: expected a number, got {}",
                    join(path, key),
                    v.type_str()
                ));
                None
            }
        }
    }
    pub(crate) fn range_f32(
        &mut self,
        t: &toml::Table,
        path: &str,
        key: &str,
        lo: f64,
        hi: f64,
    ) -> Option<[f32; 2]> {
        let v = t.get(key)?;
        let p = join(path, key);
        let arr = match v.as_array() {
            Some(a) if a.len() == 2 => a,
            _ => {
                self.problems
                    .push(format!("{p}: expected [min, max], got {v}"));
                return None;
            }
        };
        match (Self::float(&arr[0]), Self::float(&arr[1])) {
            (Some(a), Some(b)) if a <= b && a >= lo && b <= hi => Some([a as f32, b as f32]),
            _ => {
                self.problems.push(format!(
                    "{p}: expected [min, max] with {lo} <= min <= max <= {hi}, got {v}"
                ));
                None
            }
        }
    }
    pub(crate) fn range_u32(
        &mut self,
        t: &toml::Table,
        path: &str,
        key: &str,
        lo: i64,
        hi: i64,
    ) -> Option<[u32; 2]> {
        let v = t.get(key)?;
        let p = join(path, key);
        match v.as_array().map(|a| a.as_slice()) {
            Some([toml::Value::Integer(a), toml::Value::Integer(b)])
                if a <= b && *a >= lo && *b <= hi =>
            {
                Some([*a as u32, *b as u32])
            }
            _ => {
                self.problems.push(format!(
                    "{p}: expected [min, max] integers with {lo} <= min <= max <= {hi}, got {v}"
                ));
                None
            }
        }
    }
    pub(crate) fn table<'t>(
        &mut self,
        t: &'t toml::Table,
        path: &str,
        key: &str,
    ) -> Option<&'t toml::Table> {
        match t.get(key) {
            None => None,
            Some(toml::Value::Table(tt)) => Some(tt),
            Some(v) => {
                self.problems.push(format!(
                    "{}: expected a table, got {}",
                    join(path, key),
                    v.type_str()
                ));
                None
            }
        }
    }
}

pub(crate) use crate::settings::key_path as join;

pub(crate) fn check_location(w: &mut Walker, path: &str, loc: &str) {
    if let Some(rest) = loc.strip_prefix("s3://") {
        let bucket = rest.split('/').next().unwrap_or("");
        if bucket.is_empty() {
            w.problems.push(format!(
                "{path}: {loc:?} names no bucket (write s3://bucket/prefix)"
            ));
        }
    } else if loc.contains("://") {
        w.problems.push(format!(
            "{path}: {loc:?} is neither a local path nor an s3://bucket/prefix URI"
        ));
    } else if loc.is_empty() {
        w.problems.push(format!("{path} must not be empty"));
    }
}
