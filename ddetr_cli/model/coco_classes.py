"""COCO 2017 category names by category id (1..90, with gaps), for official 91-class checkpoints,
which carry no names."""

COCO_CATEGORY_NAMES = dict(
    enumerate(
        "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant - "
        "stop_sign parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe - "
        "backpack umbrella - - handbag tie suitcase frisbee skis snowboard sports_ball kite "
        "baseball_bat baseball_glove skateboard surfboard tennis_racket bottle - wine_glass cup fork "
        "knife spoon bowl banana apple sandwich orange broccoli carrot hot_dog pizza donut cake chair "
        "couch potted_plant bed - dining_table - - toilet - tv laptop mouse remote keyboard cell_phone "
        "microwave oven toaster sink refrigerator - book clock vase scissors teddy_bear hair_drier "
        "toothbrush".split(),
        start=1,
    )
)
COCO_CATEGORY_NAMES = {k: v.replace("_", " ") for k, v in COCO_CATEGORY_NAMES.items() if v != "-"}
