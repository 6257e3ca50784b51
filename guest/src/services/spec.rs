//! A service's definition, its checks, and the order dependencies impose.

use std::collections::{BTreeMap, BTreeSet};

use super::ServiceError;
use crate::config::is_dns_label;

pub use nestbox_api::types::{Restart, ServiceSpec};

/// The checks of a definition the guest makes before it stores one.
pub trait Check {
    /// Checks the fields that stand alone.
    ///
    /// # Errors
    /// [`ServiceError::Invalid`] naming the field.
    fn check(&self) -> Result<(), ServiceError>;
}

fn invalid(field: &'static str, why: impl Into<String>) -> ServiceError {
    ServiceError::Invalid {
        field,
        why: why.into(),
    }
}

impl Check for ServiceSpec {
    fn check(&self) -> Result<(), ServiceError> {
        if !is_dns_label(&self.name) {
            return Err(invalid(
                "name",
                "must be 1 to 63 of a-z, 0-9 and '-', not starting or ending with '-'",
            ));
        }
        if self.cmd.trim().is_empty() {
            return Err(invalid("cmd", "must name a program"));
        }
        if let Some(key) = self
            .env
            .keys()
            .find(|k| k.is_empty() || k.contains('=') || k.contains('\0'))
        {
            return Err(invalid("env", format!("{key:?} is not a variable name")));
        }
        if self.needs.contains(&self.name) {
            return Err(invalid("needs", "a service cannot need itself"));
        }
        if self.http_port == Some(0) {
            return Err(invalid("http_port", "must be a port from 1 to 65535"));
        }
        Ok(())
    }
}

/// The services in start order: each after those it needs.
///
/// # Errors
/// [`ServiceError::Invalid`] on a missing dependency or a cycle.
pub fn start_order(specs: &BTreeMap<String, ServiceSpec>) -> Result<Vec<String>, ServiceError> {
    fn visit(
        name: &str,
        specs: &BTreeMap<String, ServiceSpec>,
        done: &mut BTreeSet<String>,
        visiting: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) -> Result<(), ServiceError> {
        if done.contains(name) {
            return Ok(());
        }
        if !visiting.insert(name.to_owned()) {
            return Err(invalid(
                "needs",
                format!("a dependency cycle goes through \"{name}\""),
            ));
        }
        let spec = specs
            .get(name)
            .ok_or_else(|| invalid("needs", format!("no service named \"{name}\"")))?;
        for dep in &spec.needs {
            visit(dep, specs, done, visiting, order)?;
        }
        visiting.remove(name);
        done.insert(name.to_owned());
        order.push(name.to_owned());
        Ok(())
    }
    let mut order = Vec::new();
    let mut done = BTreeSet::new();
    let mut visiting = BTreeSet::new();
    for name in specs.keys() {
        visit(name, specs, &mut done, &mut visiting, &mut order)?;
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, needs: &[&str]) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            cmd: "/bin/true".into(),
            args: vec![],
            env: BTreeMap::new(),
            dir: None,
            needs: needs.iter().map(|s| (*s).to_owned()).collect(),
            http_port: None,
            restart: Restart::Always,
        }
    }

    #[test]
    fn restart_policies() {
        let parsed: ServiceSpec =
            serde_json::from_str(r#"{"name":"a","cmd":"b","restart":"on-failure"}"#).unwrap();
        assert_eq!(parsed.restart, Restart::OnFailure);
        let default: ServiceSpec = serde_json::from_str(r#"{"name":"a","cmd":"b"}"#).unwrap();
        assert_eq!(
            default.restart,
            Restart::Always,
            "as before policies existed"
        );
        assert!(
            serde_json::from_str::<ServiceSpec>(r#"{"name":"a","cmd":"b","restart":"sometimes"}"#)
                .is_err()
        );
        assert!(Restart::Always.again(true) && Restart::Always.again(false));
        assert!(!Restart::OnFailure.again(true) && Restart::OnFailure.again(false));
        assert!(!Restart::Never.again(true) && !Restart::Never.again(false));
    }

    #[test]
    fn checks_name_each_field() {
        let mut s = spec("Web", &[]);
        assert!(s.check().unwrap_err().to_string().contains("`name`"));
        s.name = "web".into();
        s.cmd = " ".into();
        assert!(s.check().unwrap_err().to_string().contains("`cmd`"));
        s.cmd = "/bin/true".into();
        s.env.insert("A=B".into(), "x".into());
        assert!(s.check().unwrap_err().to_string().contains("`env`"));
        s.env.clear();
        s.http_port = Some(0);
        assert!(s.check().unwrap_err().to_string().contains("`http_port`"));
        let unknown: Result<ServiceSpec, _> =
            serde_json::from_str(r#"{"name":"a","cmd":"b","colour":1}"#);
        assert!(unknown.unwrap_err().to_string().contains("colour"));
    }

    #[test]
    fn orders_by_needs_and_finds_cycles() {
        let mut specs = BTreeMap::new();
        for s in [
            spec("web", &["db", "cache"]),
            spec("db", &[]),
            spec("cache", &["db"]),
        ] {
            specs.insert(s.name.clone(), s);
        }
        let order = start_order(&specs).unwrap();
        let pos = |n: &str| order.iter().position(|x| x == n).unwrap();
        assert!(pos("db") < pos("cache") && pos("cache") < pos("web"));
        specs.get_mut("db").unwrap().needs.push("web".into());
        assert!(
            start_order(&specs)
                .unwrap_err()
                .to_string()
                .contains("cycle")
        );
        specs.get_mut("db").unwrap().needs = vec!["nope".into()];
        assert!(
            start_order(&specs)
                .unwrap_err()
                .to_string()
                .contains("nope")
        );
    }
}
