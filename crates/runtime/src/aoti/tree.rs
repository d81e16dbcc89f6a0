//! The structure of a package's inputs and outputs, read from its pytree specs: the package
//! itself takes and answers flat lists of tensors.

use tch::{IValue, Tensor};

/// The structure of what a package's `forward` takes or returns, read from a pytree spec. The
/// flat outputs are put back in shape by [`Tree::rebuild`], so that a handler selecting
/// `{"key": "out"}` works as it does on TorchScript.
#[derive(Debug, Clone, PartialEq)]
pub enum Tree {
    /// One tensor.
    Tensor,
    /// `None`.
    Nothing,
    /// A tuple, a list, or any other sequence.
    Sequence(Vec<Tree>),
    /// A dict, or any mapping with string or integer keys.
    Mapping(Vec<(IValueKey, Tree)>),
}

/// A key of a mapping.
#[derive(Debug, Clone, PartialEq)]
pub enum IValueKey {
    /// A string key.
    Str(String),
    /// An integer key.
    Int(i64),
}

impl Tree {
    /// Reads torch's serialized spec (`[1, {"type": ..., "context": ..., "children_spec": ...}]`);
    /// `None` for a form it does not know.
    pub fn parse(spec: &str) -> Option<Tree> {
        let value: serde_json::Value = serde_json::from_str(spec).ok()?;
        Self::node(value.get(1)?)
    }

    fn node(node: &serde_json::Value) -> Option<Tree> {
        let kind = node.get("type")?;
        if kind.is_null() {
            return Some(Tree::Tensor);
        }
        let children = node
            .get("children_spec")?
            .as_array()?
            .iter()
            .map(Self::node)
            .collect::<Option<Vec<_>>>()?;
        if kind.as_str() == Some("builtins.NoneType") {
            return Some(Tree::Nothing);
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
            Some(keys) => Tree::Mapping(keys.into_iter().zip(children).collect()),
            None => Tree::Sequence(children),
        })
    }

    /// How many tensors the structure holds.
    pub fn leaves(&self) -> usize {
        match self {
            Tree::Tensor => 1,
            Tree::Nothing => 0,
            Tree::Sequence(items) => items.iter().map(Tree::leaves).sum(),
            Tree::Mapping(items) => items.iter().map(|(_, t)| t.leaves()).sum(),
        }
    }

    /// For an input spec (`(args, kwargs)`): the length of `forward`'s first argument when it is
    /// a list (or tuple) of tensors, as a detector's `forward(images: list[Tensor])` takes.
    pub fn first_argument_list(&self) -> Option<usize> {
        let Tree::Sequence(call) = self else {
            return None;
        };
        let Some(Tree::Sequence(args)) = call.first() else {
            return None;
        };
        match args.first() {
            Some(Tree::Sequence(items))
                if !items.is_empty() && items.iter().all(|i| *i == Tree::Tensor) =>
            {
                Some(items.len())
            }
            _ => None,
        }
    }

    /// Puts `outputs`, in order, into this structure.
    pub fn rebuild(&self, outputs: &mut impl Iterator<Item = Tensor>) -> IValue {
        match self {
            Tree::Tensor => outputs.next().map_or(IValue::None, IValue::Tensor),
            Tree::Nothing => IValue::None,
            Tree::Sequence(items) => {
                IValue::Tuple(items.iter().map(|t| t.rebuild(outputs)).collect())
            }
            Tree::Mapping(items) => IValue::GenericDict(
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
        let tree = Tree::parse(&dict).unwrap();
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
        let tree = Tree::parse(&nested).unwrap();
        assert_eq!(
            tree,
            Tree::Sequence(vec![
                Tree::Tensor,
                Tree::Sequence(vec![Tree::Tensor, Tree::Tensor])
            ])
        );
        assert_eq!(Tree::parse(&format!("[1, {leaf}]")), Some(Tree::Tensor));
        assert_eq!(Tree::parse("not json"), None);
    }

    #[test]
    fn a_list_argument_is_found_in_the_input_spec() {
        let leaf = r#"{"type": null, "context": null, "children_spec": []}"#;
        let kwargs = r#"{"type": "builtins.dict", "context": "[]", "children_spec": []}"#;
        let call = |args: &str| {
            Tree::parse(&format!(
                r#"[1, {{"type": "builtins.tuple", "context": "null", "children_spec": [{{"type": "builtins.tuple", "context": "null", "children_spec": [{args}]}}, {kwargs}]}}]"#
            ))
            .unwrap()
        };
        let list = |n: usize| {
            format!(
                r#"{{"type": "builtins.list", "context": "null", "children_spec": [{}]}}"#,
                vec![leaf; n].join(", ")
            )
        };
        assert_eq!(call(&list(1)).first_argument_list(), Some(1));
        assert_eq!(call(&list(3)).first_argument_list(), Some(3));
        // forward(x) and forward(ids, mask) take tensors.
        assert_eq!(call(leaf).first_argument_list(), None);
        assert_eq!(call(&format!("{leaf}, {leaf}")).first_argument_list(), None);
        assert_eq!(call(&list(0)).first_argument_list(), None);
    }
}
