//! Stand-in for the request planner.
#[derive(Debug, Clone, Copy)]
pub enum Step {
    Apply,
    Sync,
}
pub fn plan_write(fua: bool) -> Vec<Step> {
    if fua {
        vec![Step::Apply, Step::Sync]
    } else {
        vec![Step::Apply]
    }
}
pub fn plan_flush() -> Vec<Step> {
    vec![Step::Sync]
}
