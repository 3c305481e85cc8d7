//! The same rule run one kernel per operation, every intermediate going through memory, as
//! eager PyTorch runs it: the baseline the fusion benchmark measures against. Intermediates live
//! in extra state slots after the rule's own, so the one kernel serves both.

use crate::kernel::{KOp, KProgram, Pure};

/// The kernels, in launch order, and how many extra state slots they use.
pub fn split(prog: &KProgram, n_states: usize) -> (Vec<KProgram>, usize) {
    let ops = &prog.ops;
    let mut slot: Vec<Option<usize>> = vec![None; ops.len()];
    let mut temps = 0;
    let mut kernels = Vec::new();
    // A kernel's operand: a load is repeated where it is needed; a result is read back.
    let operand = |a: usize, slot: &[Option<usize>], k: &mut Vec<KOp>| -> usize {
        k.push(match (slot[a], &ops[a]) {
            (Some(s), _) => KOp::LoadState(n_states + s),
            (None, op) => op.clone(),
        });
        k.len() - 1
    };
    let mut stores = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let mut k = Vec::new();
        let computed = match op {
            KOp::LoadP | KOp::LoadG | KOp::LoadState(_) | KOp::Pure(Pure::Scalar(_) | Pure::Const(_)) | KOp::TensorLen | KOp::LoadR(_) => continue,
            KOp::Accum(..) => unreachable!("callers pass programs without reductions"),
            KOp::StoreP(_) | KOp::StoreState(..) => {
                stores.push(op.clone());
                continue;
            }
            KOp::Pure(p) => KOp::Pure(p.map(|a| operand(a, &slot, &mut k))),
        };
        k.push(computed);
        k.push(KOp::StoreState(n_states + temps, k.len() - 1));
        slot[i] = Some(temps);
        temps += 1;
        kernels.push(KProgram::elementwise(k));
    }
    // A store of a value loaded straight from p or a state is copied first, so no store
    // sees another's write.
    for st in &stores {
        let (KOp::StoreP(a) | KOp::StoreState(_, a)) = st else { unreachable!() };
        if slot[*a].is_none() && matches!(ops[*a], KOp::LoadP | KOp::LoadState(_)) {
            kernels.push(KProgram::elementwise(vec![ops[*a].clone(), KOp::StoreState(n_states + temps, 0)]));
            slot[*a] = Some(temps);
            temps += 1;
        }
    }
    for st in stores {
        let mut k = Vec::new();
        let op = match st {
            KOp::StoreP(a) => KOp::StoreP(operand(a, &slot, &mut k)),
            KOp::StoreState(j, a) => KOp::StoreState(j, operand(a, &slot, &mut k)),
            _ => unreachable!(),
        };
        k.push(op);
        kernels.push(KProgram::elementwise(k));
    }
    (kernels, temps)
}
