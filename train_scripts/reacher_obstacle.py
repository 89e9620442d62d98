"""Reacher with an obstacle: a 2-link planar arm must touch a target without hitting a cylinder.

Modelled on gymnasium's Reacher-v5 (links 0.1 m + 0.11 m, torque-driven joints, dt 0.02 s). Each
episode places a cylinder on the path the fingertip would sweep if the joints moved straight to
the target, so a policy that only reaches crashes, and one that also avoids has to go around.

- Collision: any contact between the arm (links, fingertip) and the obstacle ends the episode
  with ``-collision_penalty``; ``info["cost"]`` is 1.0 on that step and 0.0 on every other.
- Safe success: the fingertip within ``success_radius`` of the target, moving slower than
  ``success_speed`` (a touch, not a swipe: sweeping the arm round at full torque would otherwise
  find most targets), with no collision in the episode, ends the episode with
  ``+success_bonus`` and ``info["is_success"] = True`` (SB3's key). The default radius, 0.05 m,
  is about a quarter of the reach: five times the fingertip's radius, loose enough for PPO to
  find it within minutes; the speed limit, 0.5 m/s, is what makes it a task.
- Otherwise the reward is ``progress_scale * (previous_distance - distance)`` minus a small
  control cost, distances in units of the arm's reach (0.21 m) so that crossing the whole
  workspace is worth about ``progress_scale``; episodes truncate after ``max_steps`` steps.

The reward weights are plain attributes, changed live with ``set_reward_weights`` (through
``VecEnv.env_method`` in a vectorized env). Every sampled layout is solvable: the obstacle
overlaps neither the start pose nor the target, and a search over a grid of joint angles finds a
collision-free path from the start to an arm pose that touches the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import gymnasium as gym
import mujoco
import numpy as np
from gymnasium import spaces
from scipy import ndimage

ENV_ID = "ReacherObstacle-v0"
LINK0, LINK1 = 0.1, 0.11  # upper arm; forearm to the fingertip's centre
REACH = LINK0 + LINK1
ARM_RADIUS = 0.01  # the links' capsules and the fingertip sphere
JOINT1_LIMIT = 3.0
MAX_OBSTACLE_RADIUS = 0.06
REWARD_WEIGHTS = ("progress_scale", "success_bonus", "collision_penalty")  # live knobs

XML = f"""
<mujoco model="reacher_obstacle">
  <compiler angle="radian" inertiafromgeom="true"/>
  <default>
    <joint armature="1" damping="1" limited="true"/>
    <geom contype="0" conaffinity="1" friction="1 0.1 0.1" rgba="0.7 0.7 0 1"/>
  </default>
  <option gravity="0 0 -9.81" integrator="RK4" timestep="0.01"/>
  <worldbody>
    <camera name="top" pos="0 0 0.62" xyaxes="1 0 0 0 1 0"/>
    <light pos="0 0 1" dir="0 0 -1"/>
    <geom name="ground" type="plane" size="1 1 10" rgba="0.9 0.9 0.9 1" conaffinity="0"/>
    <geom name="root" type="cylinder" fromto="0 0 0 0 0 0.02" size=".011" rgba="0.9 0.4 0.6 1"
          conaffinity="0"/>
    <body name="body0" pos="0 0 .01">
      <geom name="link0" type="capsule" fromto="0 0 0 {LINK0} 0 0" size="{ARM_RADIUS}"
            rgba="0.0 0.4 0.6 1"/>
      <joint name="joint0" type="hinge" axis="0 0 1" limited="false"/>
      <body name="body1" pos="{LINK0} 0 0">
        <joint name="joint1" type="hinge" axis="0 0 1" range="-{JOINT1_LIMIT} {JOINT1_LIMIT}"/>
        <geom name="link1" type="capsule" fromto="0 0 0 0.1 0 0" size="{ARM_RADIUS}"
              rgba="0.0 0.4 0.6 1"/>
        <body name="fingertip" pos="{LINK1} 0 0">
          <geom name="fingertip" type="sphere" size="{ARM_RADIUS}" rgba="0.0 0.8 0.6 1"/>
        </body>
      </body>
    </body>
    <body name="target" mocap="true" pos=".1 -.1 .01">
      <geom name="target" type="sphere" size=".009" rgba="0.9 0.2 0.2 1" conaffinity="0"/>
    </body>
    <body name="obstacle" mocap="true" pos="0.3 0.3 .01">
      <!-- Built at the largest radius, so MuJoCo's bounding volumes cover every episode's. -->
      <geom name="obstacle" type="cylinder" size="{MAX_OBSTACLE_RADIUS} 0.02" contype="1"
            conaffinity="0" rgba="0.2 0.2 0.2 1"/>
    </body>
  </worldbody>
  <actuator>
    <motor joint="joint0" ctrllimited="true" ctrlrange="-1 1" gear="200"/>
    <motor joint="joint1" ctrllimited="true" ctrlrange="-1 1" gear="200"/>
  </actuator>
</mujoco>
"""


@dataclass(frozen=True)
class Difficulty:
    """How an episode's obstacle is drawn: its radius and its distance from the fingertip's path
    (0 = squarely on it), both ranges in metres."""

    radius: tuple[float, float]
    offset: tuple[float, float]


DIFFICULTIES: dict[str, Difficulty] = {
    "easy": Difficulty(radius=(0.025, 0.035), offset=(0.02, 0.04)),
    "medium": Difficulty(radius=(0.035, 0.045), offset=(0.01, 0.02)),
    "hard": Difficulty(radius=(0.045, 0.06), offset=(0.0, 0.01)),
}

# Evaluation split -> (difficulty, first seed, episodes); episode i resets with seed + i.
EVAL_SPLITS: dict[str, tuple[str, int, int]] = {
    "easy": ("easy", 10_000, 30),
    "medium": ("medium", 20_000, 30),
    "hard": ("hard", 30_000, 30),
}


def forward_kinematics(q0: Any, q1: Any) -> tuple[np.ndarray, np.ndarray]:
    """Elbow and fingertip positions (x, y; trailing axis) for joint angles of any shape."""
    q0, q1 = np.asarray(q0, dtype=float), np.asarray(q1, dtype=float)
    elbow = LINK0 * np.stack([np.cos(q0), np.sin(q0)], axis=-1)
    tip = elbow + LINK1 * np.stack([np.cos(q0 + q1), np.sin(q0 + q1)], axis=-1)
    return elbow, tip


def inverse_kinematics(target: np.ndarray) -> list[tuple[float, float]]:
    """Both joint solutions (elbow one way, then the other) that put the fingertip on target."""
    x, y = float(target[0]), float(target[1])
    cos_q1 = (x * x + y * y - LINK0**2 - LINK1**2) / (2 * LINK0 * LINK1)
    solutions = []
    for sign in (1.0, -1.0):
        q1 = sign * math.acos(max(-1.0, min(1.0, cos_q1)))
        q0 = math.atan2(y, x) - math.atan2(LINK1 * math.sin(q1), LINK0 + LINK1 * math.cos(q1))
        solutions.append((q0, q1))
    return solutions


def segment_distance(a: np.ndarray, b: np.ndarray, point: np.ndarray) -> np.ndarray:
    """Distance from ``point`` to the segments a-b (arrays of points, trailing axis x, y)."""
    ab, ap = b - a, point - a
    t = np.clip(np.sum(ap * ab, axis=-1) / np.maximum(np.sum(ab * ab, axis=-1), 1e-12), 0, 1)
    return np.linalg.norm(a + t[..., None] * ab - point, axis=-1)


def arm_clearance(q0: Any, q1: Any, centre: np.ndarray) -> np.ndarray:
    """Distance between the arm's link axes and ``centre`` (subtract radii to get the gap)."""
    elbow, tip = forward_kinematics(q0, q1)
    base = np.zeros_like(elbow)
    return np.minimum(segment_distance(base, elbow, centre), segment_distance(elbow, tip, centre))


# A grid over joint space for the solvability check: q0 wraps around, q1 is limited.
_GRID_Q0 = np.linspace(-math.pi, math.pi, 72, endpoint=False)
_GRID_Q1 = np.linspace(-JOINT1_LIMIT, JOINT1_LIMIT, 61)
_GRID_ELBOW, _GRID_TIP = forward_kinematics(*np.meshgrid(_GRID_Q0, _GRID_Q1, indexing="ij"))


def _grid_cell(q0: float, q1: float) -> tuple[int, int]:
    step0 = _GRID_Q0[1] - _GRID_Q0[0]
    i = round((math.remainder(q0, 2 * math.pi) + math.pi) / step0) % len(_GRID_Q0)
    j = int(np.argmin(np.abs(_GRID_Q1 - q1)))
    return i, j


def path_exists(
    start: tuple[float, float], goals: list[tuple[float, float]], centre: np.ndarray, gap: float
) -> bool:
    """Whether a collision-free joint path joins ``start`` to one of ``goals`` on the grid.

    The grid is tiled three times along q0 so that paths wrapping around joint 0 count.
    """
    # The upper arm depends on q0 alone: one distance per grid column.
    elbows = _GRID_ELBOW[:, 0]
    upper = segment_distance(np.zeros_like(elbows), elbows, centre)[:, None]
    clearance = np.minimum(upper, segment_distance(_GRID_ELBOW, _GRID_TIP, centre))
    labels, _ = ndimage.label(np.tile(clearance > gap, (3, 1)))
    n0 = len(_GRID_Q0)
    i, j = _grid_cell(*start)
    start_label = labels[i + n0, j]
    if start_label == 0:
        return False
    for goal in goals:
        gi, gj = _grid_cell(*goal)
        if any(labels[gi + k * n0, gj] == start_label for k in range(3)):
            return True
    return False


class ReacherObstacleEnv(gym.Env[np.ndarray, np.ndarray]):
    """The task described in the module docstring; ``difficulty=None`` draws each episode's
    obstacle from one of ``DIFFICULTIES`` at random (the training mixture)."""

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["rgb_array"], "render_fps": 50}

    def __init__(
        self,
        difficulty: str | None = None,
        *,
        progress_scale: float = 3.0,
        success_bonus: float = 5.0,
        collision_penalty: float = 5.0,
        ctrl_cost_weight: float = 0.01,
        success_radius: float = 0.05,
        success_speed: float = 0.5,
        max_steps: int = 50,
        frame_skip: int = 2,
        render_mode: str | None = None,
        width: int = 240,
        height: int = 240,
    ) -> None:
        if difficulty is not None and difficulty not in DIFFICULTIES:
            raise ValueError(
                f"unknown difficulty {difficulty!r}: expected one of {sorted(DIFFICULTIES)} "
                "or None for the training mixture"
            )
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode {render_mode!r} is not supported: use 'rgb_array'")
        self.difficulty = difficulty
        self.progress_scale = progress_scale
        self.success_bonus = success_bonus
        self.collision_penalty = collision_penalty
        self.ctrl_cost_weight = ctrl_cost_weight
        self.success_radius = success_radius
        self.success_speed = success_speed
        self.max_steps = max_steps
        self.frame_skip = frame_skip
        self.render_mode = render_mode

        self.model = mujoco.MjModel.from_xml_string(XML)
        self.data = mujoco.MjData(self.model)
        self.model.vis.global_.offwidth, self.model.vis.global_.offheight = width, height
        self._width, self._height = width, height
        self._renderer: Any = None
        geom = self.model.geom
        self._obstacle_geom = geom("obstacle").id
        self._arm_geoms = {geom(name).id for name in ("link0", "link1", "fingertip")}
        self._tip_body = self.model.body("fingertip").id
        self._elbow_body = self.model.body("body1").id
        self._target_mocap = self.model.body("target").mocapid[0]
        self._obstacle_mocap = self.model.body("obstacle").mocapid[0]

        self.target = np.zeros(2)
        self.obstacle = np.zeros(2)
        self.obstacle_radius = 0.0
        self._distance = 0.0
        self._tip = np.zeros(2)
        self._steps = 0
        self._episode_difficulty = difficulty or ""
        self.action_space = spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(15,), dtype=np.float64)

    # ---- live knobs ---------------------------------------------------------------------

    def set_reward_weights(self, **weights: float) -> None:
        """Change reward weights from the next step on (names in ``REWARD_WEIGHTS``)."""
        unknown = set(weights) - set(REWARD_WEIGHTS)
        if unknown:
            raise ValueError(
                f"unknown reward weights {sorted(unknown)}: expected {list(REWARD_WEIGHTS)}"
            )
        for name, value in weights.items():
            setattr(self, name, float(value))

    def reward_weights(self) -> dict[str, float]:
        """The reward weights in force."""
        return {name: float(getattr(self, name)) for name in REWARD_WEIGHTS}

    # ---- gymnasium API ------------------------------------------------------------------

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        rng = self.np_random
        mujoco.mj_resetData(self.model, self.data)
        qpos = rng.uniform(-0.1, 0.1, size=2)
        self.data.qpos[:] = qpos
        self.data.qvel[:] = rng.uniform(-0.005, 0.005, size=2)
        self.set_layout(*self._sample_layout(qpos))
        self._steps = 0
        return self._observation(), {"cost": 0.0, "difficulty": self._episode_difficulty}

    def set_layout(self, target: Any, obstacle: Any, obstacle_radius: float) -> np.ndarray:
        """Move the target and the obstacle (x, y in metres) and resize the obstacle, keeping
        the arm where it is; returns the new observation. For tests and hand-made scenes."""
        if not 0 < obstacle_radius <= MAX_OBSTACLE_RADIUS:
            raise ValueError(
                f"obstacle_radius {obstacle_radius} is outside (0, {MAX_OBSTACLE_RADIUS}]: the "
                "model's bounding volumes are built for radii up to that"
            )
        self.target = np.array(target, dtype=float)
        self.obstacle = np.array(obstacle, dtype=float)
        self.obstacle_radius = float(obstacle_radius)
        self.data.mocap_pos[self._target_mocap, :2] = self.target
        self.data.mocap_pos[self._obstacle_mocap, :2] = self.obstacle
        self.model.geom_size[self._obstacle_geom, 0] = self.obstacle_radius
        mujoco.mj_forward(self.model, self.data)
        self._distance = self._tip_target_distance()
        self._tip = self.data.xpos[self._tip_body, :2].copy()
        return self._observation()

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        action = np.clip(np.asarray(action, dtype=float), -1.0, 1.0)
        self.data.ctrl[:] = action
        collision = False
        # Contacts are checked after every physics step so that a fast arm cannot skip one.
        for _ in range(self.frame_skip):
            mujoco.mj_step(self.model, self.data)
            if self.data.ncon and self._touches_obstacle():
                collision = True
                break
        self._steps += 1
        distance = self._tip_target_distance()
        tip = self.data.xpos[self._tip_body, :2].copy()
        speed = float(np.linalg.norm(tip - self._tip)) / (self.frame_skip * self.model.opt.timestep)
        self._tip = tip
        reward = self.progress_scale * (self._distance - distance) / REACH
        reward -= self.ctrl_cost_weight * float(np.sum(action * action))
        self._distance = distance
        success = not collision and distance <= self.success_radius and speed <= self.success_speed
        if collision:
            reward -= self.collision_penalty
        elif success:
            reward += self.success_bonus
        info = {
            "cost": 1.0 if collision else 0.0,
            "collision": collision,
            "is_success": success,
            "distance": distance,
        }
        truncated = not (collision or success) and self._steps >= self.max_steps
        return self._observation(), float(reward), collision or success, truncated, info

    def render(self) -> np.ndarray | None:
        """An RGB frame seen from above; needs an OpenGL backend (``MUJOCO_GL=egl|osmesa``)."""
        if self.render_mode != "rgb_array":
            return None
        if self._renderer is None:
            self._renderer = mujoco.Renderer(self.model, self._height, self._width)
        self._renderer.update_scene(self.data, camera="top")
        return self._renderer.render()

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None

    # ---- internals ----------------------------------------------------------------------

    def _observation(self) -> np.ndarray:
        q, qvel = self.data.qpos, self.data.qvel
        tip = self.data.xpos[self._tip_body, :2]
        elbow = self.data.xpos[self._elbow_body, :2]
        # Positions in units of the reach and velocities scaled down keep inputs near [-2, 2].
        return np.concatenate(
            [
                np.cos(q),
                np.sin(q),
                0.1 * qvel,
                self.target / REACH,
                (tip - self.target) / REACH,
                (tip - self.obstacle) / REACH,
                (elbow - self.obstacle) / REACH,
                [self.obstacle_radius / REACH],
            ]
        )

    def _tip_target_distance(self) -> float:
        return float(np.linalg.norm(self.data.xpos[self._tip_body, :2] - self.target))

    def _touches_obstacle(self) -> bool:
        for contact in self.data.contact[: self.data.ncon]:
            pair = {int(contact.geom1), int(contact.geom2)}
            if self._obstacle_geom in pair and pair & self._arm_geoms:
                return True
        return False

    def _sample_layout(self, qpos: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """A target and an obstacle (centre, radius) on the fingertip's way to it, solvable."""
        rng = self.np_random
        name = self.difficulty or str(rng.choice(sorted(DIFFICULTIES)))
        self._episode_difficulty = name
        level = DIFFICULTIES[name]
        start = (float(qpos[0]), float(qpos[1]))
        _, start_tip = forward_kinematics(*start)
        while True:
            # Targets far enough from the start that there is room for something in between.
            angle, radius = rng.uniform(-math.pi, math.pi), math.sqrt(rng.uniform(0.08**2, 0.2**2))
            target = radius * np.array([math.cos(angle), math.sin(angle)])
            if np.linalg.norm(target - start_tip) < 0.15:
                continue
            goals = inverse_kinematics(target)
            # The path a reach-only policy roughly takes: joints straight to the nearer goal.
            goal = min(goals, key=lambda g: abs(math.remainder(g[0] - start[0], 2 * math.pi)))
            delta = (math.remainder(goal[0] - start[0], 2 * math.pi), goal[1] - start[1])
            t = rng.uniform(0.3, 0.7)
            _, on_path = forward_kinematics(start[0] + t * delta[0], start[1] + t * delta[1])
            _, ahead = forward_kinematics(
                start[0] + (t + 0.01) * delta[0], start[1] + (t + 0.01) * delta[1]
            )
            tangent = (ahead - on_path) / max(float(np.linalg.norm(ahead - on_path)), 1e-9)
            normal = np.array([-tangent[1], tangent[0]]) * rng.choice([-1.0, 1.0])
            obstacle_radius = rng.uniform(*level.radius)
            centre = on_path + rng.uniform(*level.offset) * normal
            gap = obstacle_radius + ARM_RADIUS + 0.01
            if np.linalg.norm(centre - target) < gap or arm_clearance(*start, centre) < gap:
                continue
            free_goals = [g for g in goals if arm_clearance(*g, centre) > gap]
            if free_goals and path_exists(start, free_goals, centre, gap):
                return target, centre, float(obstacle_radius)


def make_env(
    difficulty: str | None = None, *, seed: int | None = None, **kwargs: Any
) -> ReacherObstacleEnv:
    """A ``ReacherObstacleEnv``, reset once with ``seed`` when given (seeding its generator)."""
    env = ReacherObstacleEnv(difficulty, **kwargs)
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
    return env


if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point=ReacherObstacleEnv)
