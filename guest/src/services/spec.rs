//! A service's definition, its checks, and the order dependencies impose.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::ServiceError;
use crate::config::is_dns_label;

/// A user service, as registered through the API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Its name, a DNS label.
    pub name: String,
    /// The program (absolute, or found through `PATH` in the container).
    pub cmd: String,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Its environment (nothing else is inherited; `PATH` defaults to the
    /// usual directories).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Its working directory in the container (default `/`).
    #[serde(default)]
    pub dir: Option<String>,
    /// Services started before this one.
    #[serde(default)]
    pub needs: Vec<String>,
    /// The port this service serves HTTP on: the VM's primary URL
    /// (`https://<vm>.<domain>/`) goes to it.
    #[serde(default)]
    pub http_port: Option<u16>,
    /// When it is started again after its process ends.
    #[serde(default)]
    pub restart: Restart,
}

/// When a service is started again after its process ends (with a backoff
/// that grows while it keeps exiting quickly). Whatever the policy, every
/// service not stopped on request starts again when the container is
/// rebuilt (a bounce).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Restart {
    /// Always (a server).
    #[default]
    Always,
    /// Only if it failed: a non-zero exit, a signal, or no start at all.
    OnFailure,
    /// Never: a one-shot task; it shows as `exited`.
    Never,
}

impl Restart {
    /// Whether a run that ended `successfully` is followed by another.
    #[must_use]
    pub fn again(self, successfully: bool) -> bool {
        match self {
            Self::Always => true,
            Self::OnFailure => !successfully,
            Self::Never => false,
        }
    }
}

fn invalid(field: &'static str, why: impl Into<String>) -> ServiceError {
    ServiceError::Invalid {
        field,
        why: why.into(),
    }
}

impl ServiceSpec {
    /// Checks the fields that stand alone.
    ///
    /// # Errors
    /// [`ServiceError::Invalid`] naming the field.
    pub fn check(&self) -> Result<(), ServiceError> {
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
