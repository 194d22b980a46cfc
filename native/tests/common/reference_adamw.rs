//! AdamW as torch.optim.AdamW's single-tensor path computes it, step for step
//! the same operations as lm::train::AdamW::step (f32 state, in place).
use tch::Tensor;

pub struct Reference {
    pub params: Vec<Tensor>,
    pub exp_avgs: Vec<Tensor>,
    pub exp_avg_sqs: Vec<Tensor>,
    pub t: u64,
}

impl Reference {
    pub fn new(params: &[Tensor]) -> Self {
        Reference {
            params: params.iter().map(|p| p.copy()).collect(),
            exp_avgs: params.iter().map(|p| p.zeros_like()).collect(),
            exp_avg_sqs: params.iter().map(|p| p.zeros_like()).collect(),
            t: 0,
        }
    }

    pub fn step(&mut self, grads: &[Tensor], lr: f64, beta1: f64, beta2: f64, weight_decay: f64, eps: f64) {
        self.t += 1;
        let bc1 = 1.0 - beta1.powi(self.t as i32);
        let bc2_sqrt = (1.0 - beta2.powi(self.t as i32)).sqrt();
        tch::no_grad(|| {
            for (i, g) in grads.iter().enumerate() {
                let w = &mut self.params[i];
                if weight_decay > 0.0 {
                    let _ = w.f_mul_scalar_(1.0 - lr * weight_decay).unwrap();
                }
                let _ = self.exp_avgs[i].f_lerp_(g, 1.0 - beta1).unwrap();
                let _ = self.exp_avg_sqs[i]
                    .f_mul_scalar_(beta2)
                    .unwrap()
                    .f_addcmul_(g, &(g * (1.0 - beta2)))
                    .unwrap();
                if lr != 0.0 {
                    let mut denom = self.exp_avg_sqs[i].sqrt();
                    let _ = denom
                        .f_div_scalar_(bc2_sqrt)
                        .unwrap()
                        .f_add_scalar_(eps)
                        .unwrap()
                        .f_mul_scalar_(-bc1 / lr)
                        .unwrap();
                    let _ = w.f_addcdiv_(&self.exp_avgs[i], &denom).unwrap();
                }
            }
        });
    }
}
