//! Fitting a batch to the batch sizes a package takes (read by [`tchserve_mar::package`]).

use tch::Tensor;

pub use tchserve_mar::package::{BatchRange, Length, batch_range, second_dim};

/// How a forward of `rows` examples is run on a package of `range`: as it is, or as `pieces`
/// forwards of `piece` examples each, the last padded by repeating its last example, whose
/// outputs are joined and cut back to `rows`.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Plan {
    Whole,
    Pieces { piece: i64, pieces: i64 },
    TooMany { max: i64 },
}

pub(super) fn plan(range: BatchRange, rows: i64) -> Plan {
    if let Some(n) = range.fixed() {
        if rows == n {
            return Plan::Whole;
        }
        return Plan::Pieces {
            piece: n,
            pieces: ((rows + n - 1) / n).max(1),
        };
    }
    match range.max {
        Some(max) if rows > max => Plan::TooMany { max },
        _ if rows < range.min => Plan::Pieces {
            piece: range.min,
            pieces: 1,
        },
        _ => Plan::Whole,
    }
}

/// Runs `forward` on `inputs` in `pieces` forwards of `piece` examples (see [`Plan`]).
pub(super) fn run_in_pieces(
    inputs: &[&Tensor],
    piece: i64,
    pieces: i64,
    mut forward: impl FnMut(&[&Tensor]) -> Result<Vec<Tensor>, tch::TchError>,
) -> Result<Vec<Tensor>, tch::TchError> {
    let rows = inputs
        .first()
        .map_or(0, |t| t.size().first().copied().unwrap_or(0));
    // Inputs that do not share a batch dimension are the handler's and the model's mismatch.
    if rows == 0 || inputs.iter().any(|t| t.size().first() != Some(&rows)) {
        return Err(tch::TchError::Torch(format!(
            "the package runs {piece} examples per forward, and the inputs do not all hold the \
             same number of examples to divide"
        )));
    }
    let mut joined: Vec<Vec<Tensor>> = Vec::new();
    for p in 0..pieces {
        let start = p * piece;
        let take = piece.min(rows - start);
        let part: Vec<Tensor> = inputs
            .iter()
            .map(|t| {
                let part = t.narrow(0, start, take);
                if take == piece {
                    return part;
                }
                // A copy of a real example, not zeros, which some models divide by.
                let last = part.narrow(0, take - 1, 1);
                let mut size = last.size();
                size[0] = piece - take;
                Tensor::cat(&[part, last.expand(&size, false)], 0)
            })
            .collect();
        let part_refs: Vec<&Tensor> = part.iter().collect();
        let outputs = forward(&part_refs)?;
        for (i, out) in outputs.into_iter().enumerate() {
            if out.size().first() != Some(&piece) {
                // One padded forward: an output without a row per example (a state, a scalar)
                // goes out as the model gave it, as it would for a batch the package takes.
                if pieces == 1 {
                    joined.push(vec![out]);
                    continue;
                }
                return Err(tch::TchError::Torch(format!(
                    "the package runs {piece} examples per forward and its output {i} is not \
                     one row per example, so {rows} examples cannot be run in pieces"
                )));
            }
            if joined.len() <= i {
                joined.push(Vec::new());
            }
            joined[i].push(out.narrow(0, 0, take));
        }
    }
    Ok(joined
        .into_iter()
        .map(|mut parts| match parts.len() {
            1 => parts.remove(0),
            _ => Tensor::cat(&parts, 0),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_fitted_to_the_range() {
        let dynamic = BatchRange {
            min: 2,
            max: Some(64),
        };
        assert_eq!(
            plan(dynamic, 1),
            Plan::Pieces {
                piece: 2,
                pieces: 1
            }
        );
        assert_eq!(plan(dynamic, 2), Plan::Whole);
        assert_eq!(plan(dynamic, 64), Plan::Whole);
        assert_eq!(plan(dynamic, 65), Plan::TooMany { max: 64 });
        assert_eq!(plan(BatchRange::ANY, 1000), Plan::Whole);
        let four = BatchRange {
            min: 4,
            max: Some(4),
        };
        assert_eq!(plan(four, 4), Plan::Whole);
        assert_eq!(
            plan(four, 9),
            Plan::Pieces {
                piece: 4,
                pieces: 3
            }
        );
        assert_eq!(
            plan(four, 1),
            Plan::Pieces {
                piece: 4,
                pieces: 1
            }
        );
    }

    /// A stand-in forward that, like a fixed-size package, takes exactly `piece` rows: each
    /// output row is its input row times 10, plus a second output of the row sums.
    fn fixed_forward(
        piece: i64,
        calls: &mut Vec<Vec<f32>>,
    ) -> impl FnMut(&[&Tensor]) -> Result<Vec<Tensor>, tch::TchError> + '_ {
        move |inputs| {
            let x = inputs[0];
            assert_eq!(x.size()[0], piece, "a forward got another number of rows");
            calls.push(Vec::<f32>::try_from(x.select(1, 0)).unwrap());
            Ok(vec![
                x * 10.0,
                x.sum_dim_intlist(1, false, tch::Kind::Float),
            ])
        }
    }

    #[test]
    fn pieces_are_padded_with_the_last_example_and_joined_in_order() {
        let x = Tensor::arange(9 * 2, (tch::Kind::Float, tch::Device::Cpu)).reshape([9, 2]);
        let mut calls = Vec::new();
        let out = run_in_pieces(&[&x], 4, 3, fixed_forward(4, &mut calls)).unwrap();
        assert_eq!(out.len(), 2);
        assert!(out[0].equal(&(&x * 10.0)));
        assert!(
            out[1].equal(&x.sum_dim_intlist(1, false, tch::Kind::Float)),
            "the padding rows were cut off again"
        );
        // First column of each forward: the ninth example fills the last piece.
        assert_eq!(
            calls,
            vec![
                vec![0., 2., 4., 6.],
                vec![8., 10., 12., 14.],
                vec![16., 16., 16., 16.]
            ]
        );

        // One example padded up to a lower bound of 2.
        let one = Tensor::from_slice(&[3.0f32, 4.0]).reshape([1, 2]);
        let mut calls = Vec::new();
        let out = run_in_pieces(&[&one], 2, 1, fixed_forward(2, &mut calls)).unwrap();
        assert!(out[0].equal(&(&one * 10.0)));
        assert_eq!(calls, vec![vec![3., 3.]]);
    }

    #[test]
    fn an_output_without_a_row_per_example_passes_one_padded_forward_unchanged() {
        let one = Tensor::from_slice(&[3.0f32, 4.0]).reshape([1, 2]);
        let state = Tensor::from_slice(&[7.0f32; 6]).reshape([3, 2]);
        let out = run_in_pieces(&[&one], 2, 1, |inputs| {
            Ok(vec![inputs[0] * 10.0, state.shallow_clone()])
        })
        .unwrap();
        assert!(out[0].equal(&(&one * 10.0)));
        assert!(out[1].equal(&state));
    }

    #[test]
    fn an_output_without_a_row_per_example_cannot_be_joined() {
        let x = Tensor::ones([3, 2], (tch::Kind::Float, tch::Device::Cpu));
        let err = run_in_pieces(&[&x], 2, 2, |_| {
            Ok(vec![Tensor::ones(
                [5],
                (tch::Kind::Float, tch::Device::Cpu),
            )])
        })
        .unwrap_err();
        assert!(matches!(err, tch::TchError::Torch(m) if m.contains("not one row per example")));
        let y = Tensor::ones([2, 2], (tch::Kind::Float, tch::Device::Cpu));
        let err = run_in_pieces(&[&x, &y], 2, 2, |_| unreachable!()).unwrap_err();
        assert!(matches!(err, tch::TchError::Torch(m) if m.contains("same number of examples")));
    }
}
