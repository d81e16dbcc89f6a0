//! Putting a package's flat outputs back into the structure its model's `forward` returned.

use tch::{IValue, Tensor};

/// The structure of what a package's `forward` returned, read from its pytree output spec: the
/// package itself answers a flat list of tensors, which [`OutTree::rebuild`] puts back in shape,
/// so that a handler selecting `{"key": "out"}` works as it does on TorchScript.
#[derive(Debug, Clone, PartialEq)]
pub enum OutTree {
    /// One tensor.
    Tensor,
    /// `None`.
    Nothing,
    /// A tuple, a list, or any other sequence.
    Sequence(Vec<OutTree>),
    /// A dict, or any mapping with string or integer keys.
    Mapping(Vec<(IValueKey, OutTree)>),
}

/// A key of an output mapping.
#[derive(Debug, Clone, PartialEq)]
pub enum IValueKey {
    /// A string key.
    Str(String),
    /// An integer key.
    Int(i64),
}

impl OutTree {
    /// Reads torch's serialized spec (`[1, {"type": ..., "context": ..., "children_spec": ...}]`);
    /// `None` for a form it does not know.
    pub fn parse(spec: &str) -> Option<OutTree> {
        let value: serde_json::Value = serde_json::from_str(spec).ok()?;
        Self::node(value.get(1)?)
    }

    fn node(node: &serde_json::Value) -> Option<OutTree> {
        let kind = node.get("type")?;
        if kind.is_null() {
            return Some(OutTree::Tensor);
        }
        let children = node
            .get("children_spec")?
            .as_array()?
            .iter()
            .map(Self::node)
            .collect::<Option<Vec<_>>>()?;
        if kind.as_str() == Some("builtins.NoneType") {
            return Some(OutTree::Nothing);
        }
        // A mapping's context is its keys, as JSON text.
        let keys = node
            .get("context")
            .and_then(|c| c.as_str())
            .and_then(|c| serde_json::from_str::<Vec<serde_json::Value>>(c).ok())
            .filter(|keys| keys.len() == children.len() && !keys.is_empty())
            .and_then(|keys| {
                keys.into_iter()
                    .map(|k| match k {
                        serde_json::Value::String(s) => Some(IValueKey::Str(s)),
                        serde_json::Value::Number(n) => n.as_i64().map(IValueKey::Int),
                        _ => None,
                    })
                    .collect::<Option<Vec<_>>>()
            });
        Some(match keys {
            Some(keys) => OutTree::Mapping(keys.into_iter().zip(children).collect()),
            None => OutTree::Sequence(children),
        })
    }

    /// How many tensors the structure holds.
    pub fn leaves(&self) -> usize {
        match self {
            OutTree::Tensor => 1,
            OutTree::Nothing => 0,
            OutTree::Sequence(items) => items.iter().map(OutTree::leaves).sum(),
            OutTree::Mapping(items) => items.iter().map(|(_, t)| t.leaves()).sum(),
        }
    }

    /// Puts `outputs`, in order, into this structure.
    pub fn rebuild(&self, outputs: &mut impl Iterator<Item = Tensor>) -> IValue {
        match self {
            OutTree::Tensor => outputs.next().map_or(IValue::None, IValue::Tensor),
            OutTree::Nothing => IValue::None,
            OutTree::Sequence(items) => {
                IValue::Tuple(items.iter().map(|t| t.rebuild(outputs)).collect())
            }
            OutTree::Mapping(items) => IValue::GenericDict(
                items
                    .iter()
                    .map(|(k, t)| {
                        let key = match k {
                            IValueKey::Str(s) => IValue::String(s.clone()),
                            IValueKey::Int(i) => IValue::Int(*i),
                        };
                        (key, t.rebuild(outputs))
                    })
                    .collect(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_are_put_back_in_the_shape_forward_returned() {
        let leaf = r#"{"type": null, "context": null, "children_spec": []}"#;
        let dict = format!(
            r#"[1, {{"type": "builtins.dict", "context": "[\"out\", \"aux\"]", "children_spec": [{leaf}, {leaf}]}}]"#
        );
        let tree = OutTree::parse(&dict).unwrap();
        assert_eq!(tree.leaves(), 2);
        let t = |v: f32| Tensor::from_slice(&[v]);
        let IValue::GenericDict(items) = tree.rebuild(&mut vec![t(1.0), t(2.0)].into_iter()) else {
            panic!("not a dict");
        };
        assert!(
            matches!(&items[0], (IValue::String(k), IValue::Tensor(v)) if k == "out" && v.double_value(&[0]) == 1.0)
        );
        assert!(
            matches!(&items[1], (IValue::String(k), IValue::Tensor(v)) if k == "aux" && v.double_value(&[0]) == 2.0)
        );

        let nested = format!(
            r#"[1, {{"type": "builtins.tuple", "context": "null", "children_spec": [{leaf}, {{"type": "builtins.list", "context": "null", "children_spec": [{leaf}, {leaf}]}}]}}]"#
        );
        let tree = OutTree::parse(&nested).unwrap();
        assert_eq!(
            tree,
            OutTree::Sequence(vec![
                OutTree::Tensor,
                OutTree::Sequence(vec![OutTree::Tensor, OutTree::Tensor])
            ])
        );
        assert_eq!(
            OutTree::parse(&format!("[1, {leaf}]")),
            Some(OutTree::Tensor)
        );
        assert_eq!(OutTree::parse("not json"), None);
    }
}
